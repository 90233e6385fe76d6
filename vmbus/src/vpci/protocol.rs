//! vPCI wire formats: message types, versions, statuses and the `#[repr(C)]` messages carried in
//! the vPCI channel's packets (facts: `reference/hyperv-vmbus-netvsc.md` §5.1, read from
//! OpenVMM's `vpci_protocol` and Linux `pci-hyperv.c`; layouts are ours, size-asserted below).

use zerocopy::byteorder::little_endian::U64 as UnalignedU64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Message types (base 0x42490000).
pub mod message {
    /// Host → guest: the functions on the bus (`DeviceDescription` entries).
    pub const BUS_RELATIONS: u32 = 0x4249_0000;
    /// Guest → host: send BUS_RELATIONS again.
    pub const QUERY_BUS_RELATIONS: u32 = 0x4249_0001;
    /// Guest → host: a function's power state (D0/D3).
    pub const DEVICE_POWER_STATE_CHANGE: u32 = 0x4249_0004;
    /// Guest → host: a function's BAR size masks.
    pub const QUERY_RESOURCE_REQUIREMENTS: u32 = 0x4249_0005;
    /// Guest → host: the bus enters D0; carries the config window address.
    pub const FDO_D0_ENTRY: u32 = 0x4249_0007;
    /// Guest → host: the bus leaves D0 (config window unmapped).
    pub const FDO_D0_EXIT: u32 = 0x4249_0008;
    /// Host → guest: stop using a function and acknowledge with EJECTION_COMPLETE.
    pub const EJECT: u32 = 0x4249_000b;
    /// Guest → host: the ejected function is no longer used.
    pub const EJECTION_COMPLETE: u32 = 0x4249_000f;
    /// Guest → host: BAR placement and MSI resources (protocol 1.1).
    pub const ASSIGNED_RESOURCES: u32 = 0x4249_0010;
    /// Guest → host: the function's resources are released.
    pub const RELEASE_RESOURCES: u32 = 0x4249_0011;
    /// Host → guest: a config block changed (PF/VF back-channel; not used by MANA).
    pub const INVALIDATE_BLOCK: u32 = 0x4249_0012;
    /// Guest → host: protocol version negotiation.
    pub const QUERY_PROTOCOL_VERSION: u32 = 0x4249_0013;
    /// Guest → host: map an MSI (protocol 1.1, processor mask).
    pub const CREATE_INTERRUPT: u32 = 0x4249_0014;
    /// Guest → host: unmap an MSI.
    pub const DELETE_INTERRUPT: u32 = 0x4249_0015;
    /// Guest → host: BAR placement and MSI resources (protocol ≥ 1.2).
    pub const ASSIGNED_RESOURCES2: u32 = 0x4249_0016;
    /// Guest → host: map an MSI (protocol ≥ 1.2, processor array).
    pub const CREATE_INTERRUPT2: u32 = 0x4249_0017;
    /// Host → guest: the functions on the bus with NUMA information (protocol ≥ 1.3).
    pub const BUS_RELATIONS2: u32 = 0x4249_0019;
}

/// Protocol versions, `major << 16 | minor`.
pub mod version {
    /// Windows 10 (1.1).
    pub const V1_1: u32 = 0x0001_0001;
    /// RS1 (1.2): ASSIGNED_RESOURCES2, CREATE_INTERRUPT2.
    pub const V1_2: u32 = 0x0001_0002;
    /// Vibranium (1.3): BUS_RELATIONS2.
    pub const V1_3: u32 = 0x0001_0003;
    /// WS2022 (1.4): CREATE_INTERRUPT3 for wide (ARM64) vectors, which x86 does not need.
    pub const V1_4: u32 = 0x0001_0004;
    /// Offered highest first. 1.5 (device reset) and 1.6 (Windows dynamic interrupt mapping)
    /// add nothing this client uses, so, like Linux, it stops at 1.4.
    pub const SUPPORTED: [u32; 4] = [V1_4, V1_3, V1_2, V1_1];
}

/// Completion statuses (NTSTATUS values).
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// QUERY_PROTOCOL_VERSION: not this version.
    pub const REVISION_MISMATCH: u32 = 0xc000_0059;
}

/// Power states in DEVICE_POWER_STATE_CHANGE.
pub mod power {
    /// Working.
    pub const D0: u32 = 1;
    /// Off.
    pub const D3: u32 = 4;
}

/// Resource types in a [`PartialResourceDescriptor`].
pub mod resource {
    /// Memory below 4 GiB of length (`adjusted_len` = bytes).
    pub const MEMORY: u8 = 3;
    /// Memory whose length is scaled by the `LARGE_*` flag.
    pub const MEMORY_LARGE: u8 = 7;
    /// `adjusted_len` is in 256-byte units.
    pub const FLAG_LARGE_40: u16 = 1 << 9;
    /// `adjusted_len` is in 64 KiB units.
    pub const FLAG_LARGE_48: u16 = 1 << 10;
    /// `adjusted_len` is in 4 GiB units.
    pub const FLAG_LARGE_64: u16 = 1 << 11;
}

/// Offset of the slot-select register in the config window (page 0).
pub const WINDOW_SLOT_SELECT: usize = 0;
/// Offset of the selected function's config space in the window (page 1).
pub const WINDOW_CONFIG_SPACE: usize = 0x1000;
/// Bytes of the config window (two pages).
pub const WINDOW_LEN: usize = 0x2000;

/// QUERY_PROTOCOL_VERSION.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryProtocolVersion {
    /// [`message::QUERY_PROTOCOL_VERSION`].
    pub message_type: u32,
    /// The version asked for.
    pub protocol_version: u32,
}

/// The completion of QUERY_PROTOCOL_VERSION.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct QueryProtocolVersionReply {
    /// [`status::SUCCESS`] or [`status::REVISION_MISMATCH`].
    pub status: u32,
    /// The host's version (informational).
    pub protocol_version: u32,
}

/// A function's PCI identity as BUS_RELATIONS reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PnpId {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Sub-class code.
    pub sub_class: u8,
    /// Base class code.
    pub base_class: u8,
    /// Subsystem vendor id.
    pub sub_vendor_id: u16,
    /// Subsystem id.
    pub sub_system_id: u16,
}

/// Header of BUS_RELATIONS / BUS_RELATIONS2; `device_count` descriptions follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct BusRelations {
    /// [`message::BUS_RELATIONS`] or [`message::BUS_RELATIONS2`].
    pub message_type: u32,
    /// Number of descriptions that follow.
    pub device_count: u32,
}

/// One function in BUS_RELATIONS.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceDescription {
    /// Identity.
    pub pnp_id: PnpId,
    /// wslot: device in bits 0-4, function in bits 5-7.
    pub wslot: u32,
    /// Serial number (pairs the VF with netvsc's VF association).
    pub serial_number: u32,
}

/// One function in BUS_RELATIONS2.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeviceDescription2 {
    /// Identity.
    pub pnp_id: PnpId,
    /// wslot.
    pub wslot: u32,
    /// Serial number.
    pub serial_number: u32,
    /// Bit 0: `numa_node` is meaningful.
    pub flags: u32,
    /// NUMA node.
    pub numa_node: u16,
    /// Reserved.
    pub reserved: u16,
}

/// FDO_D0_ENTRY.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct FdoD0Entry {
    /// [`message::FDO_D0_ENTRY`].
    pub message_type: u32,
    /// Reserved.
    pub padding: u32,
    /// Guest physical address of the [`WINDOW_LEN`]-byte config window.
    pub mmio_start: u64,
}

/// A message naming one function (QUERY_RESOURCE_REQUIREMENTS, EJECT, EJECTION_COMPLETE,
/// RELEASE_RESOURCES, FDO_D0_EXIT and QUERY_BUS_RELATIONS use the first word only).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct FunctionMessage {
    /// The message type.
    pub message_type: u32,
    /// The function's wslot.
    pub wslot: u32,
}

/// The completion of QUERY_RESOURCE_REQUIREMENTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ResourceRequirementsReply {
    /// Status.
    pub status: u32,
    /// BAR size masks as a PCI BAR reads back after writing all-ones.
    pub bar_masks: [u32; 6],
}

/// One memory resource (a placed BAR) in ASSIGNED_RESOURCES.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PartialResourceDescriptor {
    /// [`resource::MEMORY`], [`resource::MEMORY_LARGE`] or 0 (none).
    pub resource_type: u8,
    /// Share disposition (0).
    pub share_disposition: u8,
    /// `resource::FLAG_LARGE_*`.
    pub flags: u16,
    /// Guest physical address.
    pub address: UnalignedU64,
    /// Length, scaled by the large flag.
    pub adjusted_len: u32,
    /// Reserved.
    pub padding: u32,
}

/// Header of ASSIGNED_RESOURCES(2); `msi_resource_count` MSI resources follow (this client
/// sends none: interrupts are created one at a time with CREATE_INTERRUPT(2), as Linux does).
/// The completion has the same layout with a status in place of the message type.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct AssignedResources {
    /// [`message::ASSIGNED_RESOURCES`] / [`message::ASSIGNED_RESOURCES2`] (status in the reply).
    pub message_type: u32,
    /// The function.
    pub wslot: u32,
    /// One descriptor per BAR index (the high half of a 64-bit BAR stays empty).
    pub mmio_resources: [PartialResourceDescriptor; 6],
    /// MSI resources that follow.
    pub msi_resource_count: u32,
    /// Reserved.
    pub reserved: u32,
}

/// The interrupt request of CREATE_INTERRUPT (protocol 1.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MsiDescriptor {
    /// CPU vector.
    pub vector: u8,
    /// 0 = fixed, 1 = lowest priority.
    pub delivery_mode: u8,
    /// Vectors (1 for MSI-X entries).
    pub vector_count: u16,
    /// Reserved.
    pub reserved: [u16; 2],
    /// Target processors, one bit each.
    pub processor_mask: u64,
}

/// The interrupt request of CREATE_INTERRUPT2 (protocol ≥ 1.2).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MsiDescriptor2 {
    /// CPU vector.
    pub vector: u8,
    /// 0 = fixed, 1 = lowest priority.
    pub delivery_mode: u8,
    /// Vectors (1 for MSI-X entries).
    pub vector_count: u16,
    /// Entries used in `processor_array`.
    pub processor_count: u16,
    /// Target virtual processors.
    pub processor_array: [u16; 32],
    /// Reserved.
    pub reserved: u16,
}

/// CREATE_INTERRUPT.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateInterrupt {
    /// [`message::CREATE_INTERRUPT`].
    pub message_type: u32,
    /// The function.
    pub wslot: u32,
    /// The request.
    pub interrupt: MsiDescriptor,
}

/// CREATE_INTERRUPT2.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateInterrupt2 {
    /// [`message::CREATE_INTERRUPT2`].
    pub message_type: u32,
    /// The function.
    pub wslot: u32,
    /// The request.
    pub interrupt: MsiDescriptor2,
}

/// The MSI address/data the host mapped (the "translated interrupt descriptor").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct MsiRemapped {
    /// Reserved.
    pub reserved: u16,
    /// Vectors mapped.
    pub message_count: u16,
    /// MSI data to program.
    pub data: u32,
    /// MSI address to program.
    pub address: u64,
}

/// The completion of CREATE_INTERRUPT(2).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CreateInterruptReply {
    /// Status.
    pub status: u32,
    /// Reserved.
    pub reserved: u32,
    /// The mapping.
    pub interrupt: MsiRemapped,
}

/// DELETE_INTERRUPT.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DeleteInterrupt {
    /// [`message::DELETE_INTERRUPT`].
    pub message_type: u32,
    /// The function.
    pub wslot: u32,
    /// The mapping to remove, as CREATE_INTERRUPT returned it.
    pub interrupt: MsiRemapped,
}

/// DEVICE_POWER_STATE_CHANGE.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PowerStateChange {
    /// [`message::DEVICE_POWER_STATE_CHANGE`].
    pub message_type: u32,
    /// The function.
    pub wslot: u32,
    /// [`power::D0`] or [`power::D3`].
    pub target_state: u32,
}

const _: () = {
    assert!(size_of::<QueryProtocolVersion>() == 8);
    assert!(size_of::<PnpId>() == 12);
    assert!(size_of::<DeviceDescription>() == 20);
    assert!(size_of::<DeviceDescription2>() == 28);
    assert!(size_of::<FdoD0Entry>() == 16);
    assert!(size_of::<ResourceRequirementsReply>() == 28);
    assert!(size_of::<PartialResourceDescriptor>() == 20);
    assert!(size_of::<AssignedResources>() == 136);
    assert!(size_of::<MsiDescriptor>() == 16);
    assert!(size_of::<MsiDescriptor2>() == 72);
    assert!(size_of::<CreateInterrupt>() == 24);
    assert!(size_of::<CreateInterrupt2>() == 80);
    assert!(size_of::<CreateInterruptReply>() == 24);
    assert!(size_of::<DeleteInterrupt>() == 24);
    assert!(size_of::<PowerStateChange>() == 12);
};

/// Encodes a placed BAR as the host expects it: plain memory below 4 GiB of length, else
/// "large" memory with the length in the coarsest unit that holds it (rounded up).
pub fn memory_descriptor(address: u64, len: u64) -> PartialResourceDescriptor {
    if len == 0 {
        return PartialResourceDescriptor::default();
    }
    let (resource_type, flags, shift) = if len < 1 << 32 {
        (resource::MEMORY, 0, 0)
    } else if len < 1 << 40 {
        (resource::MEMORY_LARGE, resource::FLAG_LARGE_40, 8)
    } else if len < 1 << 48 {
        (resource::MEMORY_LARGE, resource::FLAG_LARGE_48, 16)
    } else {
        (resource::MEMORY_LARGE, resource::FLAG_LARGE_64, 32)
    };
    PartialResourceDescriptor {
        resource_type,
        share_disposition: 0,
        flags,
        address: UnalignedU64::new(address),
        adjusted_len: (((len - 1) >> shift) + 1) as u32,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_lengths_use_the_coarsest_unit_that_holds_them() {
        let small = memory_descriptor(0x1_0000_0000, 0x2000);
        assert_eq!(small.resource_type, resource::MEMORY);
        assert_eq!(small.adjusted_len, 0x2000);
        assert_eq!(small.address.get(), 0x1_0000_0000);
        let large = memory_descriptor(0, 1 << 33);
        assert_eq!(large.resource_type, resource::MEMORY_LARGE);
        assert_eq!(large.flags, resource::FLAG_LARGE_40);
        assert_eq!(large.adjusted_len, 1 << 25);
        assert_eq!(
            memory_descriptor(0x1000, 0),
            PartialResourceDescriptor::default()
        );
    }
}
