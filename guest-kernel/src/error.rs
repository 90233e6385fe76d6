//! The kernel's error type.

use alloc::string::String;
use core::fmt;

/// Everything that can go wrong in the kernel's control paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// Physical memory for frames, DMA or page tables ran out.
    OutOfMemory {
        /// What the memory was for.
        purpose: &'static str,
    },
    /// An MMIO mapping request was invalid (zero length, overflow, not page-aligned RAM clash).
    BadMapping {
        /// Physical start of the request.
        phys: u64,
        /// Length in bytes.
        len: u64,
    },
    /// No free interrupt vector.
    NoFreeVector,
    /// A firmware table (ACPI) was missing or malformed.
    BadFirmwareTable {
        /// Table signature, e.g. "MCFG".
        table: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// The boot loader handed over something we cannot use.
    BadBootInfo {
        /// What was wrong.
        reason: &'static str,
    },
    /// A PCI operation failed.
    Pci(PciErrorKind),
    /// No NIC the kernel can drive was found.
    NoNetworkDevice {
        /// What was looked for and what was found instead.
        reason: &'static str,
    },
    /// A NIC driver refused to start.
    Driver {
        /// The device, e.g. "virtio-net 00:03.0".
        device: String,
        /// The driver's error.
        reason: String,
    },
    /// A Hyper-V enlightenment (hypercall page, SynIC, hypercall) could not be set up or used.
    HyperV {
        /// The step, e.g. "hypercall page".
        step: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The network stack refused its configuration.
    Network {
        /// The stack's error.
        reason: String,
    },
}

/// The PCI-specific part of [`KernelError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PciErrorKind {
    /// The device no longer answers (config space reads all-ones).
    DeviceGone {
        /// Bus/device/function as "bb:dd.f".
        address: [u8; 3],
    },
    /// No space left in the bridge window for a BAR.
    NoBarSpace {
        /// Bus/device/function.
        address: [u8; 3],
        /// BAR size in bytes.
        size: u64,
    },
    /// A capability the operation needs is missing.
    MissingCapability {
        /// Bus/device/function.
        address: [u8; 3],
        /// Capability name.
        capability: &'static str,
    },
    /// A value read from the device is out of range.
    BadValue {
        /// Bus/device/function.
        address: [u8; 3],
        /// What was wrong.
        what: &'static str,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::OutOfMemory { purpose } => write!(f, "out of memory for {purpose}"),
            KernelError::BadMapping { phys, len } => {
                write!(f, "invalid MMIO mapping of {len:#x} bytes at {phys:#x}")
            }
            KernelError::NoFreeVector => write!(f, "no free interrupt vector"),
            KernelError::BadFirmwareTable { table, reason } => {
                write!(f, "ACPI table {table}: {reason}")
            }
            KernelError::BadBootInfo { reason } => write!(f, "boot information: {reason}"),
            KernelError::Pci(kind) => write!(f, "PCI: {kind}"),
            KernelError::NoNetworkDevice { reason } => write!(f, "no network device: {reason}"),
            KernelError::Driver { device, reason } => write!(f, "{device}: {reason}"),
            KernelError::HyperV { step, reason } => write!(f, "Hyper-V {step}: {reason}"),
            KernelError::Network { reason } => write!(f, "network stack: {reason}"),
        }
    }
}

impl fmt::Display for PciErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bdf = |a: &[u8; 3]| (a[0], a[1], a[2]);
        match self {
            PciErrorKind::DeviceGone { address } => {
                let (b, d, func) = bdf(address);
                write!(f, "{b:02x}:{d:02x}.{func} is gone")
            }
            PciErrorKind::NoBarSpace { address, size } => {
                let (b, d, func) = bdf(address);
                write!(
                    f,
                    "{b:02x}:{d:02x}.{func}: no window space for a {size:#x}-byte BAR"
                )
            }
            PciErrorKind::MissingCapability {
                address,
                capability,
            } => {
                let (b, d, func) = bdf(address);
                write!(f, "{b:02x}:{d:02x}.{func}: no {capability} capability")
            }
            PciErrorKind::BadValue { address, what } => {
                let (b, d, func) = bdf(address);
                write!(f, "{b:02x}:{d:02x}.{func}: {what}")
            }
        }
    }
}

impl From<PciErrorKind> for KernelError {
    fn from(kind: PciErrorKind) -> Self {
        KernelError::Pci(kind)
    }
}
