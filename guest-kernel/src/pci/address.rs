//! PCI function addresses (bus, device, function) and the routing IDs built from them.

use core::fmt;

/// Where a PCI function lives on segment 0: bus, device (slot) and function number.
///
/// Ordering is by bus, then device, then function, which is also the order of
/// [`PciAddress::routing_id`], so sorted device lists read like `lspci`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PciAddress {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// Number of devices on one bus.
    pub const DEVICES_PER_BUS: u8 = 32;
    /// Number of functions in one device (without ARI).
    pub const FUNCTIONS_PER_DEVICE: u8 = 8;

    /// The address `bus:device.function`. Out-of-range device (> 31) and function (> 7) numbers
    /// are truncated to their field widths, exactly as the routing ID would encode them.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        PciAddress {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }

    /// The address encoded by a 16-bit routing ID (bus in bits 15:8, devfn in bits 7:0).
    pub const fn from_routing_id(routing_id: u16) -> Self {
        PciAddress::new(
            (routing_id >> 8) as u8,
            ((routing_id >> 3) & 0x1f) as u8,
            routing_id as u8,
        )
    }

    /// The 16-bit routing ID (requester ID) of this function.
    pub const fn routing_id(&self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn() as u16
    }

    /// Device and function packed as `device << 3 | function`.
    pub const fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }

    /// Bus number.
    pub const fn bus(&self) -> u8 {
        self.bus
    }

    /// Device number (0..=31).
    pub const fn device(&self) -> u8 {
        self.device
    }

    /// Function number (0..=7).
    pub const fn function(&self) -> u8 {
        self.function
    }

    /// The same device's function `function`.
    pub const fn with_function(&self, function: u8) -> Self {
        PciAddress::new(self.bus, self.device, function)
    }

    /// The `[bus, device, function]` triple the error types carry.
    pub const fn as_array(&self) -> [u8; 3] {
        [self.bus, self.device, self.function]
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn displays_like_lspci() {
        assert_eq!(format!("{}", PciAddress::new(0, 0x1f, 3)), "00:1f.3");
        assert_eq!(format!("{}", PciAddress::new(0x12, 2, 0)), "12:02.0");
    }

    #[test]
    fn routing_id_round_trips_and_orders() {
        let vf0 = PciAddress::new(1, 0x10, 0);
        assert_eq!(vf0.routing_id(), 0x0180);
        assert_eq!(PciAddress::from_routing_id(0x0180), vf0);
        assert_eq!(
            PciAddress::from_routing_id(0x018e),
            PciAddress::new(1, 0x11, 6)
        );
        assert!(PciAddress::new(0, 31, 7) < PciAddress::new(1, 0, 0));
        assert!(PciAddress::new(1, 0, 1) < PciAddress::new(1, 1, 0));
    }

    #[test]
    fn out_of_range_fields_are_truncated() {
        let address = PciAddress::new(3, 40, 9);
        assert_eq!((address.device(), address.function()), (40 & 0x1f, 1));
    }
}
