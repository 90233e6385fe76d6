//! vPCI client: the Hyper-V virtual PCI bus a VF arrives on (one VMBus channel per bus),
//! from version negotiation to EJECT, with config space presented like any PCI function.
//!
//! Probe order (`reference/hyperv-vmbus-netvsc.md` §5.1, Linux `hv_pci_probe`): protocol
//! negotiation highest-first → FDO_D0_ENTRY with the config window → BUS_RELATIONS(2) → per
//! function QUERY_RESOURCE_REQUIREMENTS, BAR placement, ASSIGNED_RESOURCES(2), then the PCI
//! layer's ordinary work (capability walk, BAR sizing, MSI-X table) through [`ConfigSpace`],
//! with each MSI-X entry's address/data from CREATE_INTERRUPT(2). Removal: EJECT → the owner
//! stops using the function → [`VpciBus::release_function`] (DELETE_INTERRUPT for every
//! interrupt created, then RELEASE_RESOURCES, Linux `hv_eject_device_work` order; the answers
//! are collected by [`VpciBus::poll`] without blocking) → [`VpciBus::complete_eject`]
//! (EJECTION_COMPLETE); a rescinded channel makes every function unusable at once and nothing
//! is sent on it.
//!
//! Config space is reached through a two-page MMIO window the guest picks (on Hyper-V: carved
//! from the `_CRS` of the VMBus ACPI device's ancestor `\_SB.VMOD`, like the BARs): page 0
//! selects the function (wslot), page 1 is its config space. The window is a
//! [`RegisterIo`]; a function's config space is a [`RegisterIo`] again ([`ConfigSpace`]), so
//! the VF drivers and the PCI layer need no vPCI knowledge.
//!
//! The host side is behind [`VpciPort`] (the channel's rings plus a bounded wait); every wait
//! ends at a deadline taken from the port's clock and after a bounded number of steps.
//!
//! # The kernel's part
//! In `guest-kernel`: `hyperv::vmbus_hub` (the shared client; `HubVpciPort` is this module's
//! [`VpciPort`] over a channel), `hyperv::vpci_vf` (which bus carries netvsc's associated VF,
//! pairing by serial and MAC, the function as a PCI function through [`VpciBus::config_read32`]
//! and friends, the EJECT order: data path back to synthetic while the VF is still received
//! from, driver stopped, [`VpciBus::release_function`], then [`VpciBus::complete_eject`]),
//! `acpi` (the VMBus `_CRS` ranges from the DSDT) and `net::hyperv` (channels, MMIO, MSI-X
//! with CREATE_INTERRUPT and HvRetargetDeviceInterrupt, the MANA driver). `docs/hyperv.md`
//! describes the whole path.
//!
//! Verified here: this module's tests against a scripted host (EJECT, the release of an
//! ejected function and a host that does not answer it, malformed messages, old protocol
//! versions, silence) and the conformance tests against OpenVMM's `vpci` server with
//! `gdma` behind it (negotiation, D0, relations, config window, resources, MSI-X interrupts,
//! D3/D0, MANA over the placed BAR0, rescind); the removal sequence end to end with netvsp, a
//! VF on vPCI, the bond and a TCP stream (`conformance/tests/conformance/hyperv_vf.rs`: EJECT
//! read as link-down first, so the VF is still received from until netvsc's switch back
//! completed and the VF went quiet, every DELETE_INTERRUPT and RELEASE_RESOURCES answered by
//! the server before EJECTION_COMPLETE; a hot-added vPCI offer waits until the previous VF is
//! released, because the host may reuse the rescinded relid); the kernel's part against fakes
//! in its host tests; the fuzz target `vpci` (`fuzz/src/targets/vpci.rs`: every host answer
//! and message from the input, checked against a model of the host). Not verified: a real
//! Hyper-V host (the retarget hypercall, a real DSDT).

pub mod protocol;
#[cfg(test)]
mod tests;

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use net_device::RegisterIo;
use zerocopy::{FromBytes, IntoBytes};

use crate::error::Error;
use crate::packet::{IncomingKind, IncomingPacket, OutgoingPacket};
use protocol::{message, status, version};

/// Most functions one BUS_RELATIONS may list (wslot numbers are 8 bits).
pub const MAX_FUNCTIONS: usize = 256;
/// Most wait steps of one request, so a clock that stops cannot make a wait endless.
const MAX_WAIT_STEPS: u32 = 1_000_000;
/// Most packets one [`VpciBus::poll`] drains.
const MAX_PACKETS_PER_POLL: usize = 64;
/// Most interrupt mappings remembered for deletion (MANA uses one per queue plus one).
const MAX_INTERRUPTS: usize = 256;

/// The channel under a vPCI bus and a way to wait for it.
pub trait VpciPort {
    /// Writes one packet to the host.
    fn send(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), Error>;
    /// Takes the next packet from the host, if any, copied into `buffer`.
    fn receive<'b>(&mut self, buffer: &'b mut Vec<u8>)
    -> Result<Option<IncomingPacket<'b>>, Error>;
    /// Monotonic time in nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// Waits until the host signals the channel or `deadline_ns` passes; may return early.
    fn wait(&mut self, deadline_ns: u64);
    /// True once the host rescinded the channel.
    fn is_rescinded(&mut self) -> bool;
}

/// A function on the bus, as BUS_RELATIONS(2) described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VpciFunction {
    /// wslot (device bits 0-4, function bits 5-7): what messages and the window name it by.
    pub wslot: u32,
    /// Serial number: netvsc's VF association names the VF by it.
    pub serial_number: u32,
    /// PCI identity.
    pub pnp_id: protocol::PnpId,
    /// NUMA node, when the host gave one.
    pub numa_node: Option<u16>,
    /// The host asked for this function back (EJECT); it must not be used any more.
    pub ejecting: bool,
}

/// Something the host did that the bus's owner must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VpciEvent {
    /// A function appeared in BUS_RELATIONS.
    FunctionArrived {
        /// Its wslot.
        wslot: u32,
    },
    /// A function vanished from BUS_RELATIONS without an EJECT (stop using it).
    FunctionVanished {
        /// Its wslot.
        wslot: u32,
    },
    /// EJECT: stop using the function, then call [`VpciBus::complete_eject`].
    Eject {
        /// Its wslot.
        wslot: u32,
    },
    /// The channel was rescinded: every function is gone.
    Rescinded,
}

/// MSI address and data the host mapped for one interrupt (program them into the MSI-X entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMapping {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The host's record of the mapping, returned with DELETE_INTERRUPT.
    remapped: protocol::MsiRemapped,
}

/// One BAR the guest placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BarPlacement {
    /// Guest physical address (0 = not placed).
    pub address: u64,
    /// Bytes.
    pub len: u64,
}

/// Counters (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpciCounters {
    /// Requests sent with a completion awaited.
    pub requests: u64,
    /// BUS_RELATIONS(2) messages applied.
    pub relations: u64,
    /// EJECTs received for known functions.
    pub ejects: u64,
    /// EJECTION_COMPLETEs sent.
    pub ejections_completed: u64,
    /// Host messages dropped as malformed or naming no known function.
    pub malformed: u64,
    /// Completions that matched no request in flight.
    pub stray_completions: u64,
    /// INVALIDATE_BLOCK and other messages this client does not act on.
    pub ignored: u64,
    /// DELETE_INTERRUPTs sent by [`VpciBus::release_function`].
    pub interrupts_deleted: u64,
    /// RELEASE_RESOURCES sent by [`VpciBus::release_function`].
    pub resources_released: u64,
    /// Completions of those that arrived.
    pub releases_answered: u64,
    /// Of those, the ones with a failure status (logged; the function is let go anyway).
    pub releases_refused: u64,
    /// Of those, the ones the owner stopped waiting for ([`VpciBus::stop_awaiting`]) or that
    /// were still unanswered after the request timeout.
    pub releases_unanswered: u64,
}

/// A DELETE_INTERRUPT or RELEASE_RESOURCES whose completion has not arrived yet.
#[derive(Clone, Copy, Debug)]
struct Awaited {
    transaction: u64,
    what: &'static str,
    wslot: u32,
    sent_ns: u64,
}

/// Where the bus is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    /// FDO_D0_EXIT sent: the window is no longer decoded.
    Stopped,
    Rescinded,
}

/// A probed vPCI bus.
pub struct VpciBus<P: VpciPort, W: RegisterIo> {
    port: P,
    window: W,
    window_phys: u64,
    version: u32,
    timeout_ns: u64,
    functions: Vec<VpciFunction>,
    events: VecDeque<VpciEvent>,
    relations_seen: bool,
    next_transaction: u64,
    counters: VpciCounters,
    state: State,
    rescind_reported: bool,
    /// Interrupts CREATE_INTERRUPT mapped and nobody deleted yet, by wslot, oldest first.
    interrupts: Vec<(u32, protocol::MsiRemapped)>,
    /// Release messages sent without blocking, until their completions arrive.
    awaited: Vec<Awaited>,
    /// The window's slot select and the following config access must not interleave.
    window_lock: spin::Mutex<()>,
}

impl<P: VpciPort, W: RegisterIo> core::fmt::Debug for VpciBus<P, W> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VpciBus")
            .field("version", &self.version)
            .field("window_phys", &self.window_phys)
            .field("functions", &self.functions)
            .field("counters", &self.counters)
            .field("state", &self.state)
            .finish()
    }
}

impl<P: VpciPort, W: RegisterIo> VpciBus<P, W> {
    /// Negotiates the protocol (highest first), enters D0 with the config window at
    /// `window_phys` (mapped by `window`, at least [`protocol::WINDOW_LEN`] bytes) and waits
    /// for the host's BUS_RELATIONS. Each request may take `timeout_ns`.
    pub fn probe(port: P, window: W, window_phys: u64, timeout_ns: u64) -> Result<Self, Error> {
        if window.len() < protocol::WINDOW_LEN || window_phys & 0xfff != 0 {
            return Err(Error::RingLayout {
                reason: "vPCI config window must be two page-aligned pages",
            });
        }
        let mut bus = VpciBus {
            port,
            window,
            window_phys,
            version: 0,
            timeout_ns,
            functions: Vec::new(),
            events: VecDeque::new(),
            relations_seen: false,
            next_transaction: 1,
            counters: VpciCounters::default(),
            state: State::Ready,
            rescind_reported: false,
            interrupts: Vec::new(),
            awaited: Vec::new(),
            window_lock: spin::Mutex::new(()),
        };
        bus.negotiate()?;
        let entry = protocol::FdoD0Entry {
            message_type: message::FDO_D0_ENTRY,
            padding: 0,
            mmio_start: window_phys,
        };
        let reply = bus.request("FDO_D0_ENTRY", entry.as_bytes())?;
        check_status("FDO_D0_ENTRY", &reply)?;
        if !bus.relations_seen {
            // The host sends relations with D0 entry; ask once more in case it did not.
            let query = protocol::FunctionMessage {
                message_type: message::QUERY_BUS_RELATIONS,
                wslot: 0,
            };
            let transaction = bus.take_transaction();
            let start = bus.port.now_ns();
            bus.send_retrying(
                "QUERY_BUS_RELATIONS",
                transaction,
                false,
                &query.as_bytes()[..4],
                start,
                &mut 0,
            )?;
            bus.wait_until("BUS_RELATIONS", |bus| bus.relations_seen)?;
        }
        log::info!(
            "vpci: protocol {:#x}, config window at {window_phys:#x}, {} function(s)",
            bus.version,
            bus.functions.len()
        );
        Ok(bus)
    }

    fn negotiate(&mut self) -> Result<(), Error> {
        for candidate in version::SUPPORTED {
            let query = protocol::QueryProtocolVersion {
                message_type: message::QUERY_PROTOCOL_VERSION,
                protocol_version: candidate,
            };
            let reply = self.request("QUERY_PROTOCOL_VERSION", query.as_bytes())?;
            let Ok((reply, _)) = protocol::QueryProtocolVersionReply::read_from_prefix(&reply)
            else {
                // A bare status is how a host answers what it cannot parse.
                check_status("QUERY_PROTOCOL_VERSION", &reply)?;
                return Err(Error::VpciMalformed {
                    what: "protocol version reply",
                });
            };
            match reply.status {
                status::SUCCESS => {
                    self.version = candidate;
                    return Ok(());
                }
                status::REVISION_MISMATCH => continue,
                other => {
                    return Err(Error::VpciRefused {
                        what: "QUERY_PROTOCOL_VERSION",
                        status: other,
                    });
                }
            }
        }
        Err(Error::VpciNoVersion {
            lowest: version::SUPPORTED[version::SUPPORTED.len() - 1],
        })
    }

    /// The negotiated protocol version (`major << 16 | minor`).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The config window's guest physical address.
    pub fn window_phys(&self) -> u64 {
        self.window_phys
    }

    /// The functions on the bus (ejecting ones included until their EJECTION_COMPLETE).
    pub fn functions(&self) -> &[VpciFunction] {
        &self.functions
    }

    /// The function at `wslot`, unless it was ejected or the bus is gone.
    pub fn function(&self, wslot: u32) -> Result<&VpciFunction, Error> {
        self.ensure_usable()?;
        self.functions
            .iter()
            .find(|function| function.wslot == wslot && !function.ejecting)
            .ok_or(Error::VpciUnknownFunction { wslot })
    }

    /// Counters.
    pub fn counters(&self) -> VpciCounters {
        self.counters
    }

    /// The port (for the owner's waits and tests).
    pub fn port_mut(&mut self) -> &mut P {
        &mut self.port
    }

    /// True once the channel was rescinded.
    pub fn is_rescinded(&mut self) -> bool {
        if self.state != State::Rescinded && self.port.is_rescinded() {
            self.mark_rescinded();
        }
        self.state == State::Rescinded
    }

    fn mark_rescinded(&mut self) {
        if self.state != State::Rescinded {
            log::warn!(
                "vpci: channel rescinded, {} function(s) gone",
                self.functions.len()
            );
            self.state = State::Rescinded;
        }
    }

    fn ensure_usable(&self) -> Result<(), Error> {
        match self.state {
            State::Ready => Ok(()),
            State::Stopped => Err(Error::VpciBusGone {
                reason: "bus left D0",
            }),
            State::Rescinded => Err(Error::VpciBusGone {
                reason: "channel rescinded",
            }),
        }
    }

    /// Handles what the host sent since the last call and returns the next event, if any.
    pub fn poll(&mut self) -> Option<VpciEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.is_rescinded() {
            // Nobody is left to answer.
            self.awaited.clear();
            if !self.rescind_reported {
                self.rescind_reported = true;
                return Some(VpciEvent::Rescinded);
            }
            return None;
        }
        self.expire_awaited();
        for _ in 0..MAX_PACKETS_PER_POLL {
            match self.receive_one() {
                Ok(Some(Received::Completion(_))) => self.counters.stray_completions += 1,
                Ok(Some(Received::Handled)) => {}
                Ok(None) => break,
                Err(error) => {
                    log::warn!("vpci: channel unusable: {error}");
                    self.mark_rescinded();
                    break;
                }
            }
        }
        self.events.pop_front()
    }

    /// Reads the dword at `offset` of `wslot`'s config space. A function that is gone reads
    /// as all-ones, like removed PCI hardware.
    pub fn config_read32(&self, wslot: u32, offset: usize) -> Result<u32, Error> {
        self.check_config_access(wslot, offset, 4)?;
        let _guard = self.window_lock.lock();
        self.window.write32(protocol::WINDOW_SLOT_SELECT, wslot);
        Ok(self.window.read32(protocol::WINDOW_CONFIG_SPACE + offset))
    }

    /// Writes the dword at `offset` of `wslot`'s config space.
    pub fn config_write32(&self, wslot: u32, offset: usize, value: u32) -> Result<(), Error> {
        self.check_config_access(wslot, offset, 4)?;
        let _guard = self.window_lock.lock();
        self.window.write32(protocol::WINDOW_SLOT_SELECT, wslot);
        self.window
            .write32(protocol::WINDOW_CONFIG_SPACE + offset, value);
        Ok(())
    }

    /// Writes the 16-bit register at `offset` with a true 16-bit access (the command register
    /// must not be written as a dword: that would clear status bits).
    pub fn config_write16(&self, wslot: u32, offset: usize, value: u16) -> Result<(), Error> {
        self.check_config_access(wslot, offset, 2)?;
        let _guard = self.window_lock.lock();
        self.window.write32(protocol::WINDOW_SLOT_SELECT, wslot);
        self.window
            .write16(protocol::WINDOW_CONFIG_SPACE + offset, value);
        Ok(())
    }

    /// Writes the byte at `offset`.
    pub fn config_write8(&self, wslot: u32, offset: usize, value: u8) -> Result<(), Error> {
        self.check_config_access(wslot, offset, 1)?;
        let _guard = self.window_lock.lock();
        self.window.write32(protocol::WINDOW_SLOT_SELECT, wslot);
        self.window
            .write8(protocol::WINDOW_CONFIG_SPACE + offset, value);
        Ok(())
    }

    fn check_config_access(&self, wslot: u32, offset: usize, width: usize) -> Result<(), Error> {
        self.function(wslot)?;
        if !offset.is_multiple_of(width)
            || offset + width > protocol::WINDOW_LEN - protocol::WINDOW_CONFIG_SPACE
        {
            return Err(Error::VpciMalformed {
                what: "config access outside the function's config page",
            });
        }
        Ok(())
    }

    /// `wslot`'s config space as a register block (4 KiB), for the PCI layer and drivers.
    pub fn config_space(&self, wslot: u32) -> Result<ConfigSpace<'_, P, W>, Error> {
        self.function(wslot)?;
        Ok(ConfigSpace { bus: self, wslot })
    }

    /// QUERY_RESOURCE_REQUIREMENTS: the BAR size masks the host reports for `wslot`.
    pub fn resource_requirements(&mut self, wslot: u32) -> Result<[u32; 6], Error> {
        self.function(wslot)?;
        let query = protocol::FunctionMessage {
            message_type: message::QUERY_RESOURCE_REQUIREMENTS,
            wslot,
        };
        let reply = self.request("QUERY_RESOURCE_REQUIREMENTS", query.as_bytes())?;
        check_status("QUERY_RESOURCE_REQUIREMENTS", &reply)?;
        let (reply, _) =
            protocol::ResourceRequirementsReply::read_from_prefix(&reply).map_err(|_| {
                Error::VpciMalformed {
                    what: "resource requirements reply",
                }
            })?;
        Ok(reply.bar_masks)
    }

    /// ASSIGNED_RESOURCES(2): tells the host where `wslot`'s BARs were placed (the PCI layer
    /// programs the BAR registers too, as on any PCI bus). Interrupts are created separately.
    pub fn assign_resources(&mut self, wslot: u32, bars: &[BarPlacement; 6]) -> Result<(), Error> {
        self.function(wslot)?;
        let message_type = if self.version >= version::V1_2 {
            message::ASSIGNED_RESOURCES2
        } else {
            message::ASSIGNED_RESOURCES
        };
        let assigned = protocol::AssignedResources {
            message_type,
            wslot,
            mmio_resources: bars.map(|bar| protocol::memory_descriptor(bar.address, bar.len)),
            msi_resource_count: 0,
            reserved: 0,
        };
        let reply = self.request("ASSIGNED_RESOURCES", assigned.as_bytes())?;
        check_status("ASSIGNED_RESOURCES", &reply)
    }

    /// RELEASE_RESOURCES for `wslot` (before giving the BARs' MMIO back), waiting for the
    /// answer. The event loop uses [`VpciBus::release_function`], which does not block.
    pub fn release_resources(&mut self, wslot: u32) -> Result<(), Error> {
        self.function(wslot)?;
        let release = protocol::FunctionMessage {
            message_type: message::RELEASE_RESOURCES,
            wslot,
        };
        let reply = self.request("RELEASE_RESOURCES", release.as_bytes())?;
        check_status("RELEASE_RESOURCES", &reply)
    }

    /// CREATE_INTERRUPT(2): maps one interrupt of `wslot` to CPU `vector` on the virtual
    /// processors `processors` (at most 32) and returns the MSI address/data to program into
    /// the MSI-X entry. On Hyper-V the kernel also issues HvRetargetDeviceInterrupt when it
    /// unmasks the entry.
    pub fn create_interrupt(
        &mut self,
        wslot: u32,
        vector: u8,
        processors: &[u16],
    ) -> Result<MsiMapping, Error> {
        self.function(wslot)?;
        if processors.is_empty() || processors.len() > 32 {
            return Err(Error::VpciMalformed {
                what: "interrupt target list (1..=32 processors)",
            });
        }
        let reply = if self.version >= version::V1_2 {
            let mut processor_array = [0u16; 32];
            processor_array[..processors.len()].copy_from_slice(processors);
            let create = protocol::CreateInterrupt2 {
                message_type: message::CREATE_INTERRUPT2,
                wslot,
                interrupt: protocol::MsiDescriptor2 {
                    vector,
                    delivery_mode: 0,
                    vector_count: 1,
                    processor_count: processors.len() as u16,
                    processor_array,
                    reserved: 0,
                },
            };
            self.request("CREATE_INTERRUPT2", create.as_bytes())?
        } else {
            let mut processor_mask = 0u64;
            for &processor in processors {
                if processor >= 64 {
                    return Err(Error::VpciMalformed {
                        what: "interrupt target beyond processor 63 (protocol 1.1)",
                    });
                }
                processor_mask |= 1 << processor;
            }
            let create = protocol::CreateInterrupt {
                message_type: message::CREATE_INTERRUPT,
                wslot,
                interrupt: protocol::MsiDescriptor {
                    vector,
                    delivery_mode: 0,
                    vector_count: 1,
                    reserved: [0; 2],
                    processor_mask,
                },
            };
            self.request("CREATE_INTERRUPT", create.as_bytes())?
        };
        check_status("CREATE_INTERRUPT", &reply)?;
        let (reply, _) =
            protocol::CreateInterruptReply::read_from_prefix(&reply).map_err(|_| {
                Error::VpciMalformed {
                    what: "create interrupt reply",
                }
            })?;
        // Kept so that letting the function go deletes what was created (the host's table
        // of mapped interrupts is finite); a function's MSI-X table is small.
        if self.interrupts.len() < MAX_INTERRUPTS {
            self.interrupts.push((wslot, reply.interrupt));
        }
        Ok(MsiMapping {
            address: reply.interrupt.address,
            data: reply.interrupt.data,
            remapped: reply.interrupt,
        })
    }

    /// DELETE_INTERRUPT for a mapping [`VpciBus::create_interrupt`] returned.
    pub fn delete_interrupt(&mut self, wslot: u32, mapping: &MsiMapping) -> Result<(), Error> {
        self.function(wslot)?;
        let delete = protocol::DeleteInterrupt {
            message_type: message::DELETE_INTERRUPT,
            wslot,
            interrupt: mapping.remapped,
        };
        let reply = self.request("DELETE_INTERRUPT", delete.as_bytes())?;
        if let Some(index) = self
            .interrupts
            .iter()
            .position(|&(known, interrupt)| known == wslot && interrupt == mapping.remapped)
        {
            self.interrupts.remove(index);
        }
        check_status("DELETE_INTERRUPT", &reply)
    }

    /// Interrupts of `wslot` created and not deleted yet.
    pub fn interrupts_of(&self, wslot: u32) -> usize {
        self.interrupts
            .iter()
            .filter(|&&(known, _)| known == wslot)
            .count()
    }

    /// Lets the host take back what `wslot` was given, once its driver stopped (before
    /// EJECTION_COMPLETE, or when the VF is let go without an EJECT): DELETE_INTERRUPT for
    /// every interrupt [`VpciBus::create_interrupt`] mapped, then RELEASE_RESOURCES (Linux
    /// tears the MSIs down with the driver, then reports the resources released). Each asks
    /// for a completion but none is waited for here: [`VpciBus::poll`] takes the answers,
    /// [`VpciBus::awaiting`] tells whether any is still due and [`VpciBus::stop_awaiting`]
    /// gives up on a silent host. Works on an ejecting function. Returns the messages sent.
    /// A rescinded channel or a function no longer listed gets nothing (its interrupts are
    /// forgotten).
    pub fn release_function(&mut self, wslot: u32) -> Result<usize, Error> {
        let mut mappings = Vec::new();
        self.interrupts.retain(|&(known, interrupt)| {
            if known == wslot {
                mappings.push(interrupt);
            }
            known != wslot
        });
        self.ensure_usable()?;
        if self.is_rescinded() {
            return Err(Error::VpciBusGone {
                reason: "channel rescinded",
            });
        }
        if !self
            .functions
            .iter()
            .any(|function| function.wslot == wslot)
        {
            return Err(Error::VpciUnknownFunction { wslot });
        }
        let mut sent = 0;
        for interrupt in mappings {
            let delete = protocol::DeleteInterrupt {
                message_type: message::DELETE_INTERRUPT,
                wslot,
                interrupt,
            };
            self.post("DELETE_INTERRUPT", wslot, delete.as_bytes())?;
            self.counters.interrupts_deleted += 1;
            sent += 1;
        }
        let release = protocol::FunctionMessage {
            message_type: message::RELEASE_RESOURCES,
            wslot,
        };
        self.post("RELEASE_RESOURCES", wslot, release.as_bytes())?;
        self.counters.resources_released += 1;
        Ok(sent + 1)
    }

    /// Answers [`VpciBus::release_function`] still waits for, for `wslot`.
    pub fn awaiting(&self, wslot: u32) -> usize {
        self.awaited
            .iter()
            .filter(|awaited| awaited.wslot == wslot)
            .count()
    }

    /// Stops waiting for `wslot`'s answers (a host that does not answer): each is counted
    /// and logged. Returns how many were given up.
    pub fn stop_awaiting(&mut self, wslot: u32) -> usize {
        let before = self.awaited.len();
        let mut given_up = Vec::new();
        self.awaited.retain(|awaited| {
            if awaited.wslot == wslot {
                given_up.push(*awaited);
            }
            awaited.wslot != wslot
        });
        for awaited in &given_up {
            self.unanswered(awaited);
        }
        before - self.awaited.len()
    }

    fn unanswered(&mut self, awaited: &Awaited) {
        self.counters.releases_unanswered += 1;
        log::warn!(
            "vpci: no answer to {} of wslot {:#x}; going on without it",
            awaited.what,
            awaited.wslot
        );
    }

    /// Sends `payload` asking for a completion that [`VpciBus::poll`] collects later.
    fn post(&mut self, what: &'static str, wslot: u32, payload: &[u8]) -> Result<(), Error> {
        let transaction = self.take_transaction();
        self.port
            .send(&OutgoingPacket::in_band(transaction, true, &[payload]))?;
        let sent_ns = self.port.now_ns();
        self.awaited.push(Awaited {
            transaction,
            what,
            wslot,
            sent_ns,
        });
        Ok(())
    }

    /// Takes the completion of a posted message, if `transaction` is one.
    fn take_awaited(&mut self, transaction: u64, payload: &[u8]) -> bool {
        let Some(index) = self
            .awaited
            .iter()
            .position(|awaited| awaited.transaction == transaction)
        else {
            return false;
        };
        let awaited = self.awaited.remove(index);
        self.counters.releases_answered += 1;
        if let Err(error) = check_status(awaited.what, payload) {
            self.counters.releases_refused += 1;
            log::warn!("vpci: wslot {:#x}: {error}", awaited.wslot);
        }
        true
    }

    /// Forgets posted messages older than the request timeout (nobody waits for them any
    /// more; keeps the list bounded against a silent host).
    fn expire_awaited(&mut self) {
        if self.awaited.is_empty() {
            return;
        }
        let now = self.port.now_ns();
        let timeout_ns = self.timeout_ns;
        let mut expired = Vec::new();
        self.awaited.retain(|awaited| {
            let old = now.saturating_sub(awaited.sent_ns) >= timeout_ns;
            if old {
                expired.push(*awaited);
            }
            !old
        });
        for awaited in &expired {
            self.unanswered(awaited);
        }
    }

    /// DEVICE_POWER_STATE_CHANGE to D0 (`true`) or D3.
    pub fn set_power(&mut self, wslot: u32, d0: bool) -> Result<(), Error> {
        self.function(wslot)?;
        let change = protocol::PowerStateChange {
            message_type: message::DEVICE_POWER_STATE_CHANGE,
            wslot,
            target_state: if d0 {
                protocol::power::D0
            } else {
                protocol::power::D3
            },
        };
        let reply = self.request("DEVICE_POWER_STATE_CHANGE", change.as_bytes())?;
        check_status("DEVICE_POWER_STATE_CHANGE", &reply)
    }

    /// EJECTION_COMPLETE for a function the host ejected, once nothing uses it any more (data
    /// path switched back, driver stopped). The function is forgotten.
    pub fn complete_eject(&mut self, wslot: u32) -> Result<(), Error> {
        let ejecting = |function: &VpciFunction| function.wslot == wslot && function.ejecting;
        if !self.functions.iter().any(ejecting) {
            return Err(Error::VpciUnknownFunction { wslot });
        }
        if !self.is_rescinded() {
            let complete = protocol::FunctionMessage {
                message_type: message::EJECTION_COMPLETE,
                wslot,
            };
            let transaction = self.take_transaction();
            let start = self.port.now_ns();
            // On failure the function stays known (ejecting), so the acknowledgement can be
            // tried again: the host waits for it.
            self.send_retrying(
                "EJECTION_COMPLETE",
                transaction,
                false,
                complete.as_bytes(),
                start,
                &mut 0,
            )?;
            self.counters.ejections_completed += 1;
        }
        // Else the host took the whole bus back: nobody is left to acknowledge to.
        self.functions.retain(|function| !ejecting(function));
        Ok(())
    }

    /// FDO_D0_EXIT: the host stops decoding the config window (before the window's MMIO is
    /// reused or the channel closed).
    pub fn stop(&mut self) -> Result<(), Error> {
        self.ensure_usable()?;
        let exit = protocol::FunctionMessage {
            message_type: message::FDO_D0_EXIT,
            wslot: 0,
        };
        let reply = self.request("FDO_D0_EXIT", &exit.as_bytes()[..4])?;
        self.state = State::Stopped;
        check_status("FDO_D0_EXIT", &reply)
    }

    /// Gives the port back (to close the channel).
    pub fn into_port(self) -> P {
        self.port
    }

    fn take_transaction(&mut self) -> u64 {
        let transaction = self.next_transaction;
        self.next_transaction = self.next_transaction.wrapping_add(1).max(1);
        transaction
    }

    /// Sends `payload` with a completion requested and returns the completion's payload;
    /// host messages arriving meanwhile are handled.
    fn request(&mut self, what: &'static str, payload: &[u8]) -> Result<Vec<u8>, Error> {
        if self.is_rescinded() {
            return Err(Error::VpciBusGone {
                reason: "channel rescinded",
            });
        }
        let transaction = self.take_transaction();
        self.counters.requests += 1;
        let start = self.port.now_ns();
        let deadline = start.saturating_add(self.timeout_ns);
        let mut steps = 0u32;
        self.send_retrying(what, transaction, true, payload, start, &mut steps)?;
        loop {
            match self.receive_one()? {
                Some(Received::Completion((id, payload))) if id == transaction => {
                    return Ok(payload);
                }
                Some(Received::Completion(_)) => self.counters.stray_completions += 1,
                Some(Received::Handled) => {}
                None => {
                    if self.is_rescinded() {
                        return Err(Error::VpciBusGone {
                            reason: "channel rescinded",
                        });
                    }
                    self.step(what, start, deadline, &mut steps)?;
                }
            }
        }
    }

    /// Sends one packet; while the ring is full (it drains as the host works) waits and handles
    /// host messages, until `self.timeout_ns` after `start`.
    fn send_retrying(
        &mut self,
        what: &'static str,
        transaction: u64,
        completion_requested: bool,
        payload: &[u8],
        start: u64,
        steps: &mut u32,
    ) -> Result<(), Error> {
        let deadline = start.saturating_add(self.timeout_ns);
        loop {
            let pieces = [payload];
            let packet = OutgoingPacket::in_band(transaction, completion_requested, &pieces);
            match self.port.send(&packet) {
                Ok(()) => return Ok(()),
                Err(Error::RingFull { .. }) => {
                    self.step(what, start, deadline, steps)?;
                    // The packet is not sent yet: no completion can answer it.
                    if let Some(Received::Completion(_)) = self.receive_one()? {
                        self.counters.stray_completions += 1;
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Waits (bounded) until `done` holds, handling host messages.
    fn wait_until(
        &mut self,
        what: &'static str,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), Error> {
        let start = self.port.now_ns();
        let deadline = start.saturating_add(self.timeout_ns);
        let mut steps = 0u32;
        while !done(self) {
            match self.receive_one()? {
                Some(Received::Completion(_)) => self.counters.stray_completions += 1,
                Some(Received::Handled) => {}
                None => {
                    if self.is_rescinded() {
                        return Err(Error::VpciBusGone {
                            reason: "channel rescinded",
                        });
                    }
                    self.step(what, start, deadline, &mut steps)?;
                }
            }
        }
        Ok(())
    }

    fn step(
        &mut self,
        what: &'static str,
        start: u64,
        deadline: u64,
        steps: &mut u32,
    ) -> Result<(), Error> {
        let now = self.port.now_ns();
        *steps += 1;
        if now >= deadline || *steps > MAX_WAIT_STEPS {
            return Err(Error::Timeout {
                what,
                waited_ms: now.saturating_sub(start) / 1_000_000,
            });
        }
        self.port.wait(deadline);
        Ok(())
    }

    /// Takes one packet: completions are returned, host messages handled.
    fn receive_one(&mut self) -> Result<Option<Received>, Error> {
        let mut buffer = Vec::new();
        let Some(packet) = self.port.receive(&mut buffer)? else {
            return Ok(None);
        };
        match packet.kind {
            IncomingKind::Completion => {
                let (transaction, payload) = (packet.transaction_id, packet.payload.to_vec());
                if self.take_awaited(transaction, &payload) {
                    return Ok(Some(Received::Handled));
                }
                Ok(Some(Received::Completion((transaction, payload))))
            }
            IncomingKind::InBand => {
                let payload = packet.payload.to_vec();
                self.handle_message(&payload);
                Ok(Some(Received::Handled))
            }
            _ => {
                self.counters.malformed += 1;
                log::warn!("vpci: dropped a packet of an unexpected kind");
                Ok(Some(Received::Handled))
            }
        }
    }

    fn handle_message(&mut self, payload: &[u8]) {
        let Ok((message_type, _)) = u32::read_from_prefix(payload) else {
            self.drop_malformed("message without a type");
            return;
        };
        match message_type {
            message::BUS_RELATIONS | message::BUS_RELATIONS2 => self.apply_relations(payload),
            message::EJECT => {
                let Ok((eject, _)) = protocol::FunctionMessage::read_from_prefix(payload) else {
                    self.drop_malformed("EJECT");
                    return;
                };
                match self
                    .functions
                    .iter_mut()
                    .find(|function| function.wslot == eject.wslot)
                {
                    Some(function) if !function.ejecting => {
                        function.ejecting = true;
                        self.counters.ejects += 1;
                        log::info!("vpci: EJECT of wslot {:#x}", eject.wslot);
                        self.events
                            .push_back(VpciEvent::Eject { wslot: eject.wslot });
                    }
                    Some(_) => self.counters.ignored += 1,
                    None => self.drop_malformed("EJECT of an unknown wslot"),
                }
            }
            _ => {
                self.counters.ignored += 1;
                log::debug!("vpci: ignored message {message_type:#x}");
            }
        }
    }

    fn drop_malformed(&mut self, what: &'static str) {
        self.counters.malformed += 1;
        log::warn!("vpci: dropped a malformed {what}");
    }

    fn apply_relations(&mut self, payload: &[u8]) {
        let Ok((header, rest)) = protocol::BusRelations::read_from_prefix(payload) else {
            self.drop_malformed("BUS_RELATIONS");
            return;
        };
        let count = header.device_count as usize;
        let second = header.message_type == message::BUS_RELATIONS2;
        let entry_len = if second {
            size_of::<protocol::DeviceDescription2>()
        } else {
            size_of::<protocol::DeviceDescription>()
        };
        if count > MAX_FUNCTIONS || count * entry_len > rest.len() {
            self.drop_malformed("BUS_RELATIONS (count exceeds the packet)");
            return;
        }
        let mut listed = Vec::with_capacity(count);
        for entry in rest.chunks_exact(entry_len).take(count) {
            let function = if second {
                let Ok((description, _)) = protocol::DeviceDescription2::read_from_prefix(entry)
                else {
                    continue;
                };
                VpciFunction {
                    wslot: description.wslot,
                    serial_number: description.serial_number,
                    pnp_id: description.pnp_id,
                    numa_node: (description.flags & 1 != 0).then_some(description.numa_node),
                    ejecting: false,
                }
            } else {
                let Ok((description, _)) = protocol::DeviceDescription::read_from_prefix(entry)
                else {
                    continue;
                };
                VpciFunction {
                    wslot: description.wslot,
                    serial_number: description.serial_number,
                    pnp_id: description.pnp_id,
                    numa_node: None,
                    ejecting: false,
                }
            };
            if listed
                .iter()
                .any(|known: &VpciFunction| known.wslot == function.wslot)
            {
                self.drop_malformed("BUS_RELATIONS (duplicate wslot)");
                return;
            }
            listed.push(function);
        }
        for old in &self.functions {
            if !old.ejecting && !listed.iter().any(|new| new.wslot == old.wslot) {
                self.events
                    .push_back(VpciEvent::FunctionVanished { wslot: old.wslot });
            }
        }
        for new in &mut listed {
            match self.functions.iter().find(|old| old.wslot == new.wslot) {
                // An ejecting function stays ejecting until its EJECTION_COMPLETE.
                Some(old) => new.ejecting = old.ejecting,
                None => self
                    .events
                    .push_back(VpciEvent::FunctionArrived { wslot: new.wslot }),
            }
        }
        // Ejecting functions no longer listed are kept until acknowledged.
        let pending: Vec<VpciFunction> = self
            .functions
            .iter()
            .filter(|old| old.ejecting && !listed.iter().any(|new| new.wslot == old.wslot))
            .copied()
            .collect();
        listed.extend(pending);
        self.functions = listed;
        self.relations_seen = true;
        self.counters.relations += 1;
    }
}

enum Received {
    Completion((u64, Vec<u8>)),
    Handled,
}

/// Fails unless the completion starts with [`status::SUCCESS`].
fn check_status(what: &'static str, reply: &[u8]) -> Result<(), Error> {
    let Ok((value, _)) = u32::read_from_prefix(reply) else {
        return Err(Error::VpciMalformed { what });
    };
    if value == status::SUCCESS {
        Ok(())
    } else {
        Err(Error::VpciRefused {
            what,
            status: value,
        })
    }
}

/// One function's config space through the bus's window, as a register block: what the PCI
/// layer walks (capabilities, BARs, MSI-X). A function that is gone reads as all-ones.
pub struct ConfigSpace<'a, P: VpciPort, W: RegisterIo> {
    bus: &'a VpciBus<P, W>,
    wslot: u32,
}

impl<P: VpciPort, W: RegisterIo> RegisterIo for ConfigSpace<'_, P, W> {
    fn read32(&self, offset: usize) -> u32 {
        self.bus
            .config_read32(self.wslot, offset)
            .unwrap_or(u32::MAX)
    }

    fn write32(&self, offset: usize, value: u32) {
        if let Err(error) = self.bus.config_write32(self.wslot, offset, value) {
            log::warn!("vpci: config write dropped: {error}");
        }
    }

    fn read16(&self, offset: usize) -> u16 {
        let dword = self.read32(offset & !3);
        (dword >> ((offset & 2) * 8)) as u16
    }

    fn write16(&self, offset: usize, value: u16) {
        if let Err(error) = self.bus.config_write16(self.wslot, offset, value) {
            log::warn!("vpci: config write dropped: {error}");
        }
    }

    fn read8(&self, offset: usize) -> u8 {
        let dword = self.read32(offset & !3);
        (dword >> ((offset & 3) * 8)) as u8
    }

    fn write8(&self, offset: usize, value: u8) {
        if let Err(error) = self.bus.config_write8(self.wslot, offset, value) {
            log::warn!("vpci: config write dropped: {error}");
        }
    }

    fn len(&self) -> usize {
        protocol::WINDOW_LEN - protocol::WINDOW_CONFIG_SPACE
    }
}

/// Places BARs with the size masks `bar_masks` (as QUERY_RESOURCE_REQUIREMENTS or BAR sizing
/// report them) in the MMIO range `[start, start + len)`: each BAR naturally aligned, largest
/// first so alignment wastes least. On Hyper-V the range is carved from `\_SB.VMOD`'s `_CRS`.
pub fn place_bars(bar_masks: &[u32; 6], start: u64, len: u64) -> Result<[BarPlacement; 6], Error> {
    let mut sizes = [0u64; 6];
    let mut index = 0;
    while index < 6 {
        let mask = bar_masks[index];
        // Bit 0 = I/O space (never on a VF); bits 1-2 = 2 → 64-bit.
        if mask == 0 || mask & 1 != 0 {
            index += 1;
            continue;
        }
        let is_64 = (mask >> 1) & 3 == 2;
        let mut full = u64::from(mask & !0xf);
        if is_64 {
            let high = bar_masks.get(index + 1).copied().unwrap_or(0);
            full |= u64::from(high) << 32;
        } else {
            full |= 0xffff_ffff_0000_0000;
        }
        if full != 0 {
            let size = (!full).wrapping_add(1);
            // A device decodes a BAR of a power-of-two size only: a mask with holes (the host's
            // word, untrusted) would be placed misaligned.
            if !size.is_power_of_two() {
                return Err(Error::VpciMalformed {
                    what: "BAR size mask (size not a power of two)",
                });
            }
            sizes[index] = size;
        }
        index += if is_64 { 2 } else { 1 };
    }
    let mut order: Vec<usize> = (0..6).filter(|&i| sizes[i] != 0).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]));
    let end = start.saturating_add(len);
    let mut cursor = start;
    let mut placements = [BarPlacement::default(); 6];
    let mut needed = 0u64;
    for i in order {
        let size = sizes[i];
        let aligned = cursor
            .checked_add(size - 1)
            .map(|value| value & !(size - 1));
        let Some(aligned) = aligned else {
            return Err(Error::VpciNoMmioSpace {
                needed: u64::MAX,
                available: len,
            });
        };
        needed = needed.saturating_add(aligned - cursor + size);
        cursor = aligned.saturating_add(size);
        if cursor > end {
            return Err(Error::VpciNoMmioSpace {
                needed,
                available: len,
            });
        }
        placements[i] = BarPlacement {
            address: aligned,
            len: size,
        };
    }
    Ok(placements)
}
