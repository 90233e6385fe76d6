//! The kernel's error type.

use alloc::string::String;

use thiserror::Error;

/// Everything that can go wrong in the kernel's control paths.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum KernelError {
    /// Physical memory for frames, DMA or page tables ran out.
    #[error("out of memory for {purpose}")]
    OutOfMemory {
        /// What the memory was for.
        purpose: &'static str,
    },
    /// An MMIO mapping request was invalid (zero length, overflow, not page-aligned RAM clash).
    #[error("invalid MMIO mapping of {len:#x} bytes at {phys:#x}")]
    BadMapping {
        /// Physical start of the request.
        phys: u64,
        /// Length in bytes.
        len: u64,
    },
    /// No free interrupt vector.
    #[error("no free interrupt vector")]
    NoFreeVector,
    /// A firmware table (ACPI) was missing or malformed.
    #[error("ACPI table {table}: {reason}")]
    BadFirmwareTable {
        /// Table signature, e.g. "MCFG".
        table: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// The boot loader handed over something we cannot use.
    #[error("boot information: {reason}")]
    BadBootInfo {
        /// What was wrong.
        reason: &'static str,
    },
    /// A PCI operation failed.
    #[error("PCI: {0}")]
    Pci(#[from] PciErrorKind),
    /// No NIC the kernel can drive was found.
    #[error("no network device: {reason}")]
    NoNetworkDevice {
        /// What was looked for and what was found instead.
        reason: &'static str,
    },
    /// A NIC driver refused to start.
    #[error("{device}: {reason}")]
    Driver {
        /// The device, e.g. "virtio-net 00:03.0".
        device: String,
        /// The driver's error.
        reason: String,
    },
    /// A Hyper-V enlightenment (hypercall page, SynIC, hypercall) could not be set up or used.
    #[error("Hyper-V {step}: {reason}")]
    HyperV {
        /// The step, e.g. "hypercall page".
        step: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The network stack refused its configuration.
    #[error("network stack: {reason}")]
    Network {
        /// The stack's error.
        reason: String,
    },
}

/// The PCI-specific part of [`KernelError`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PciErrorKind {
    /// The device no longer answers (config space reads all-ones).
    #[error("{:02x}:{:02x}.{} is gone", .address[0], .address[1], .address[2])]
    DeviceGone {
        /// Bus/device/function as "bb:dd.f".
        address: [u8; 3],
    },
    /// No space left in the bridge window for a BAR.
    #[error("{:02x}:{:02x}.{}: no window space for a {size:#x}-byte BAR", .address[0], .address[1], .address[2])]
    NoBarSpace {
        /// Bus/device/function.
        address: [u8; 3],
        /// BAR size in bytes.
        size: u64,
    },
    /// A capability the operation needs is missing.
    #[error("{:02x}:{:02x}.{}: no {capability} capability", .address[0], .address[1], .address[2])]
    MissingCapability {
        /// Bus/device/function.
        address: [u8; 3],
        /// Capability name.
        capability: &'static str,
    },
    /// A value read from the device is out of range.
    #[error("{:02x}:{:02x}.{}: {what}", .address[0], .address[1], .address[2])]
    BadValue {
        /// Bus/device/function.
        address: [u8; 3],
        /// What was wrong.
        what: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn messages_carry_their_context() {
        let address = [0x00, 0x1f, 3];
        let cases = [
            (
                KernelError::OutOfMemory {
                    purpose: "page tables",
                },
                "out of memory for page tables",
            ),
            (
                KernelError::BadMapping {
                    phys: 0xfe00_0000,
                    len: 0x1000,
                },
                "invalid MMIO mapping of 0x1000 bytes at 0xfe000000",
            ),
            (KernelError::NoFreeVector, "no free interrupt vector"),
            (
                KernelError::BadFirmwareTable {
                    table: "MCFG",
                    reason: "bad checksum",
                },
                "ACPI table MCFG: bad checksum",
            ),
            (
                KernelError::BadBootInfo {
                    reason: "no memory map",
                },
                "boot information: no memory map",
            ),
            (
                PciErrorKind::DeviceGone { address }.into(),
                "PCI: 00:1f.3 is gone",
            ),
            (
                PciErrorKind::NoBarSpace {
                    address,
                    size: 0x4000,
                }
                .into(),
                "PCI: 00:1f.3: no window space for a 0x4000-byte BAR",
            ),
            (
                PciErrorKind::MissingCapability {
                    address,
                    capability: "MSI-X",
                }
                .into(),
                "PCI: 00:1f.3: no MSI-X capability",
            ),
            (
                PciErrorKind::BadValue {
                    address: [0xab, 2, 0],
                    what: "BAR size",
                }
                .into(),
                "PCI: ab:02.0: BAR size",
            ),
            (
                KernelError::NoNetworkDevice {
                    reason: "no virtio-net or netvsc",
                },
                "no network device: no virtio-net or netvsc",
            ),
            (
                KernelError::Driver {
                    device: "virtio-net 00:03.0".into(),
                    reason: "device is gone".into(),
                },
                "virtio-net 00:03.0: device is gone",
            ),
            (
                KernelError::HyperV {
                    step: "hypercall page",
                    reason: "no MSR".into(),
                },
                "Hyper-V hypercall page: no MSR",
            ),
            (
                KernelError::Network {
                    reason: "bad address".into(),
                },
                "network stack: bad address",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }
}
