//! MSI-X tables and MSI/MSI-X enabling (PCI Local Bus 3.0 §6.8). The table lives in a BAR and
//! is reached through [`RegisterIo`], so host tests use a fake register window.

use super::capability::{MsiCapability, MsixCapability, find_capability, id, msi, msix};
use super::config::{Command, ConfigAccess, read_command, write_command};
use super::{PciAddress, PciBus, bad_value, gone};
use crate::error::{KernelError, PciErrorKind};
use net_device::RegisterIo;

/// Bytes per MSI-X table entry.
const ENTRY_SIZE: usize = 16;
/// Entry: message address, low dword.
const ENTRY_ADDRESS_LOW: usize = 0x0;
/// Entry: message address, high dword.
const ENTRY_ADDRESS_HIGH: usize = 0x4;
/// Entry: message data.
const ENTRY_DATA: usize = 0x8;
/// Entry: vector control.
const ENTRY_VECTOR_CONTROL: usize = 0xc;
/// Vector control: the entry is masked.
const VECTOR_CONTROL_MASKED: u32 = 1 << 0;

/// A function's MSI-X table, inside the register window of its table BAR.
#[derive(Clone, Debug)]
pub struct MsixTable<R> {
    io: R,
    table_offset: usize,
    entries: u16,
}

impl<R: RegisterIo> MsixTable<R> {
    /// The table described by `capability`, inside `io` (the mapping of the table BAR).
    /// Fails when the table does not fit in the window.
    pub fn new(
        io: R,
        capability: &MsixCapability,
        address: PciAddress,
    ) -> Result<Self, KernelError> {
        let table_offset = capability.table_offset as usize;
        let table_bytes = usize::from(capability.table_size) * ENTRY_SIZE;
        let fits = table_offset
            .checked_add(table_bytes)
            .is_some_and(|end| end <= io.len());
        if !fits {
            return Err(bad_value(address, "MSI-X table lies outside its BAR"));
        }
        Ok(MsixTable {
            io,
            table_offset,
            entries: capability.table_size,
        })
    }

    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    fn entry_offset(&self, entry: u16) -> Option<usize> {
        (entry < self.entries).then(|| self.table_offset + usize::from(entry) * ENTRY_SIZE)
    }

    /// Writes address and data of `entry`, leaving it masked (the spec forbids changing an
    /// unmasked entry). Returns false for an entry beyond the table.
    pub fn program(&self, entry: u16, message_address: u64, message_data: u32) -> bool {
        let Some(offset) = self.entry_offset(entry) else {
            return false;
        };
        self.io
            .write32(offset + ENTRY_VECTOR_CONTROL, VECTOR_CONTROL_MASKED);
        self.io
            .write32(offset + ENTRY_ADDRESS_LOW, message_address as u32);
        self.io
            .write32(offset + ENTRY_ADDRESS_HIGH, (message_address >> 32) as u32);
        self.io.write32(offset + ENTRY_DATA, message_data);
        true
    }

    /// Masks or unmasks `entry`. Returns false for an entry beyond the table.
    pub fn set_masked(&self, entry: u16, masked: bool) -> bool {
        let Some(offset) = self.entry_offset(entry) else {
            return false;
        };
        let control = self.io.read32(offset + ENTRY_VECTOR_CONTROL);
        let control = if masked {
            control | VECTOR_CONTROL_MASKED
        } else {
            control & !VECTOR_CONTROL_MASKED
        };
        self.io.write32(offset + ENTRY_VECTOR_CONTROL, control);
        true
    }

    /// True when `entry` is masked (entries beyond the table count as masked).
    pub fn is_masked(&self, entry: u16) -> bool {
        self.entry_offset(entry).is_none_or(|offset| {
            self.io.read32(offset + ENTRY_VECTOR_CONTROL) & VECTOR_CONTROL_MASKED != 0
        })
    }

    /// The (address, data) pair programmed into `entry`.
    pub fn message(&self, entry: u16) -> Option<(u64, u32)> {
        let offset = self.entry_offset(entry)?;
        let low = u64::from(self.io.read32(offset + ENTRY_ADDRESS_LOW));
        let high = u64::from(self.io.read32(offset + ENTRY_ADDRESS_HIGH));
        Some(((high << 32) | low, self.io.read32(offset + ENTRY_DATA)))
    }
}

/// Enables MSI-X on `address` with `messages[i]` (address, data) in table entry `i`.
///
/// Sequence (PCI 3.0 §6.8.2.3 and §6.8.3.5): MSI off; Command MEM (to reach the table), BME
/// (MSI-X messages are memory writes) and INTx disable; MSI-X Enable with Function Mask set;
/// program every used entry and unmask it, mask every other entry; clear Function Mask.
pub fn enable_msix<R: RegisterIo>(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    table_io: R,
    messages: &[(u64, u32)],
) -> Result<MsixTable<R>, KernelError> {
    let capability = MsixCapability::find(access, address)?;
    if messages.is_empty() || messages.len() > usize::from(capability.table_size) {
        return Err(bad_value(
            address,
            "MSI-X vector count is 0 or exceeds the table size",
        ));
    }
    let table = MsixTable::new(table_io, &capability, address)?;
    let control_offset = capability.offset + msix::CONTROL;

    if let Some(msi_offset) = find_capability(access, address, id::MSI) {
        let msi_control = access.read16(address, msi_offset + msi::CONTROL);
        if msi_control & msi::CONTROL_ENABLE != 0 {
            access.write16(
                address,
                msi_offset + msi::CONTROL,
                msi_control & !msi::CONTROL_ENABLE,
            );
        }
    }
    let command = read_command(access, address);
    if command.bits() == u16::MAX {
        return Err(gone(address));
    }
    write_command(
        access,
        address,
        command | Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTERRUPT_DISABLE,
    );

    let control = access.read16(address, control_offset);
    access.write16(
        address,
        control_offset,
        control | msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK,
    );
    for entry in 0..table.entries() {
        match messages.get(usize::from(entry)) {
            Some(&(message_address, message_data)) => {
                table.program(entry, message_address, message_data);
                table.set_masked(entry, false);
            }
            None => {
                table.set_masked(entry, true);
            }
        }
    }
    let control = access.read16(address, control_offset);
    access.write16(
        address,
        control_offset,
        (control | msix::CONTROL_ENABLE) & !msix::CONTROL_FUNCTION_MASK,
    );
    log::debug!(
        "pci: {address} MSI-X enabled with {} vectors",
        messages.len()
    );
    Ok(table)
}

/// Disables MSI-X on `address` (entries keep their contents).
pub fn disable_msix(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
) -> Result<(), KernelError> {
    let capability = MsixCapability::find(access, address)?;
    let control_offset = capability.offset + msix::CONTROL;
    let control = access.read16(address, control_offset);
    access.write16(address, control_offset, control & !msix::CONTROL_ENABLE);
    Ok(())
}

/// Enables single-message MSI on `address` with (address, data) = `message`
/// (PCI 3.0 §6.8.1): program address/data, Multiple Message Enable = 1 message, enable.
pub fn enable_msi(
    access: &(impl ConfigAccess + ?Sized),
    address: PciAddress,
    message: (u64, u32),
) -> Result<(), KernelError> {
    let offset = find_capability(access, address, id::MSI).ok_or(KernelError::Pci(
        PciErrorKind::MissingCapability {
            address: address.as_array(),
            capability: "msi",
        },
    ))?;
    let capability = MsiCapability::read(access, address, offset)?;
    let (message_address, message_data) = message;
    if !capability.is_64bit && message_address > u64::from(u32::MAX) {
        return Err(bad_value(
            address,
            "MSI address above 4 GiB for a 32-bit MSI capability",
        ));
    }
    let control = access.read16(address, offset + msi::CONTROL);
    access.write16(
        address,
        offset + msi::CONTROL,
        control & !(msi::CONTROL_ENABLE | msi::CONTROL_MULTIPLE_ENABLE),
    );
    access.write32(address, offset + msi::ADDRESS_LOW, message_address as u32);
    if capability.is_64bit {
        access.write32(
            address,
            offset + msi::ADDRESS_HIGH,
            (message_address >> 32) as u32,
        );
        access.write16(address, offset + msi::DATA_64, message_data as u16);
    } else {
        access.write16(address, offset + msi::DATA_32, message_data as u16);
    }
    if capability.per_vector_mask {
        let mask_offset = if capability.is_64bit {
            msi::MASK_64
        } else {
            msi::MASK_32
        };
        access.write32(address, offset + mask_offset, 0);
    }
    let command = read_command(access, address);
    write_command(
        access,
        address,
        command | Command::BUS_MASTER | Command::INTERRUPT_DISABLE,
    );
    access.write16(
        address,
        offset + msi::CONTROL,
        (control & !msi::CONTROL_MULTIPLE_ENABLE) | msi::CONTROL_ENABLE,
    );
    log::debug!("pci: {address} MSI enabled");
    Ok(())
}

impl<A: ConfigAccess> PciBus<A> {
    /// Enables MSI-X on `address` with `messages[i]` in entry `i`, through `table_io` (the
    /// table BAR's register window). See [`enable_msix`]; the kernel's `enable_msix` wrapper
    /// maps the BAR and turns vectors into messages.
    pub fn enable_msix_with<R: RegisterIo>(
        &self,
        address: PciAddress,
        table_io: R,
        messages: &[(u64, u32)],
    ) -> Result<MsixTable<R>, KernelError> {
        enable_msix(&self.access, address, table_io, messages)
    }

    /// Enables single-message MSI on `address`.
    pub fn enable_msi(&self, address: PciAddress, message: (u64, u32)) -> Result<(), KernelError> {
        enable_msi(&self.access, address, message)
    }

    /// Disables MSI-X on `address`.
    pub fn disable_msix(&self, address: PciAddress) -> Result<(), KernelError> {
        disable_msix(&self.access, address)
    }

    /// The MSI-X capability of `address` (table size and BARs), for drivers wiring vectors.
    pub fn msix_capability(&self, address: PciAddress) -> Result<MsixCapability, KernelError> {
        MsixCapability::find(&self.access, address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::capability::msix as msix_reg;
    use crate::pci::config::reg;
    use crate::pci::fake::{FakeConfigSpace, FakeFunction, FakeRegisters, templates};

    const PF: PciAddress = PciAddress::new(0, 3, 0);

    fn igb() -> FakeConfigSpace {
        let space = FakeConfigSpace::new();
        space.insert(PF, templates::igb_pf());
        space
    }

    #[test]
    fn programs_entries_unmasks_used_ones_and_clears_function_mask() {
        let space = igb();
        let registers = FakeRegisters::new(0x4000);
        let messages = [(0xfee0_0000, 0x41), (0xfee0_0000, 0x42)];
        let table = enable_msix(&space, PF, registers.clone(), &messages).unwrap();
        assert_eq!(table.entries(), 10);
        assert_eq!(table.message(0), Some((0xfee0_0000, 0x41)));
        assert_eq!(table.message(1), Some((0xfee0_0000, 0x42)));
        assert!(!table.is_masked(0) && !table.is_masked(1));
        assert!(
            (2..10).all(|entry| table.is_masked(entry)),
            "unused entries stay masked"
        );
        let control = space.read16(PF, 0x70 + msix_reg::CONTROL);
        assert_eq!(
            control & (msix_reg::CONTROL_ENABLE | msix_reg::CONTROL_FUNCTION_MASK),
            msix_reg::CONTROL_ENABLE
        );
        let command = Command::from_bits_retain(space.read16(PF, reg::COMMAND));
        assert!(
            command
                .contains(Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTERRUPT_DISABLE)
        );
        // The table was written through the register window, entry 1 at 0x10.
        assert_eq!(registers.read32(0x18), 0x42);
    }

    #[test]
    fn too_many_vectors_or_small_window_are_refused() {
        let space = igb();
        let many = [(0xfee0_0000u64, 0x40u32); 11];
        assert!(enable_msix(&space, PF, FakeRegisters::new(0x4000), &many).is_err());
        assert!(enable_msix(&space, PF, FakeRegisters::new(0x40), &many[..1]).is_err());
        assert!(enable_msix(&space, PF, FakeRegisters::new(0x4000), &[]).is_err());
    }

    #[test]
    fn table_refuses_entries_past_its_end() {
        let capability = MsixCapability {
            offset: 0x70,
            table_size: 3,
            table_bar: 3,
            table_offset: 0,
            pba_bar: 3,
            pba_offset: 0x2000,
        };
        let table = MsixTable::new(FakeRegisters::new(0x4000), &capability, PF).unwrap();
        assert!(!table.program(3, 0xfee0_0000, 0x50));
        assert!(!table.set_masked(3, false));
        assert!(table.is_masked(3));
        assert_eq!(table.message(3), None);
    }

    #[test]
    fn enables_64bit_msi_and_disables_it_for_msix() {
        let space = igb();
        enable_msi(&space, PF, (0xfee0_1000, 0x47)).unwrap();
        let control = space.read16(PF, 0x50 + msi::CONTROL);
        assert_ne!(control & msi::CONTROL_ENABLE, 0);
        assert_eq!(space.read32(PF, 0x50 + msi::ADDRESS_LOW), 0xfee0_1000);
        assert_eq!(space.read16(PF, 0x50 + msi::DATA_64), 0x47);
        enable_msix(
            &space,
            PF,
            FakeRegisters::new(0x4000),
            &[(0xfee0_0000, 0x41)],
        )
        .unwrap();
        let control = space.read16(PF, 0x50 + msi::CONTROL);
        assert_eq!(
            control & msi::CONTROL_ENABLE,
            0,
            "MSI and MSI-X are never both on"
        );
    }

    #[test]
    fn msi_on_function_without_capability_is_reported() {
        let space = FakeConfigSpace::new();
        space.insert(PF, FakeFunction::endpoint(1, 2, [2, 0, 0]));
        let error = enable_msi(&space, PF, (0xfee0_0000, 0x40)).unwrap_err();
        assert!(matches!(
            error,
            KernelError::Pci(PciErrorKind::MissingCapability { .. })
        ));
    }
}
