//! The contract between NIC drivers, the kernel that hosts them and the failover bond.
//!
//! Drivers (`vf-driver`, `netvsc-fallback`) depend only on this crate: they reach device
//! registers through [`RegisterIo`], get DMA memory through [`DmaAllocator`], and present
//! themselves to the network stack as a [`NetDevice`]. The kernel implements the first two over
//! real MMIO and identity-mapped RAM; host tests implement them over fake device models.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use core::fmt;

pub mod checksum;
#[cfg(feature = "heap-dma")]
pub mod heap_dma;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddress = MacAddress([0xff; 6]);

    /// True for a unicast address that is not all zeros (what a NIC may legitimately own).
    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A physical (device-visible) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct PhysAddr(pub u64);

/// Access to one device register window (a BAR), by byte offset.
///
/// Implemented by the kernel's MMIO mapping (the only volatile code) and by fake device models
/// in host tests. Offsets are relative to the start of the window; implementations must
/// bounds-check them (an out-of-range offset reads as all-ones and writes are dropped) so that a
/// driver bug can never touch memory outside the window.
pub trait RegisterIo {
    /// Reads the 32-bit register at `offset`.
    fn read32(&self, offset: usize) -> u32;
    /// Writes the 32-bit register at `offset`.
    fn write32(&self, offset: usize, value: u32);
    /// Writes the 64-bit register at `offset`. The default is two 32-bit writes, low dword
    /// first; real MMIO overrides it with one 64-bit access, which devices whose doorbells
    /// take a single 8-byte write (MANA) depend on.
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
    /// Reads the 16-bit register at `offset`.
    fn read16(&self, offset: usize) -> u16 {
        let word = self.read32(offset & !3);
        (word >> ((offset & 2) * 8)) as u16
    }
    /// Writes the 16-bit register at `offset` (read-modify-write of the containing word by
    /// default; real MMIO overrides this with a true 16-bit access).
    fn write16(&self, offset: usize, value: u16) {
        let shift = (offset & 2) * 8;
        let word = self.read32(offset & !3);
        let word = (word & !(0xffff << shift)) | (u32::from(value) << shift);
        self.write32(offset & !3, word);
    }
    /// Reads the 8-bit register at `offset`.
    fn read8(&self, offset: usize) -> u8 {
        let word = self.read32(offset & !3);
        (word >> ((offset & 3) * 8)) as u8
    }
    /// Writes the 8-bit register at `offset`.
    fn write8(&self, offset: usize, value: u8) {
        let shift = (offset & 3) * 8;
        let word = self.read32(offset & !3);
        let word = (word & !(0xff << shift)) | (u32::from(value) << shift);
        self.write32(offset & !3, word);
    }
    /// Size of the window in bytes.
    fn len(&self) -> usize;
    /// True when the window has no registers.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block of memory the device can reach by DMA.
///
/// The memory stays valid until the region is dropped (returned to its allocator by the
/// implementation's `Drop`). `virt` is where the CPU sees it, `phys` where the device does.
pub struct DmaRegion {
    virt: core::ptr::NonNull<u8>,
    phys: PhysAddr,
    len: usize,
    release: Option<fn(core::ptr::NonNull<u8>, PhysAddr, usize)>,
}

impl DmaRegion {
    /// Wraps memory handed out by a [`DmaAllocator`].
    ///
    /// # Safety
    /// `virt` must point to `len` bytes that are valid for reads and writes, zero-initialised,
    /// exclusively owned by the returned region until `release` (if any) is called with the
    /// same three values on drop, and reachable by devices at `phys`.
    pub unsafe fn from_raw(
        virt: core::ptr::NonNull<u8>,
        phys: PhysAddr,
        len: usize,
        release: Option<fn(core::ptr::NonNull<u8>, PhysAddr, usize)>,
    ) -> Self {
        DmaRegion {
            virt,
            phys,
            len,
            release,
        }
    }

    /// The device-visible address of the first byte.
    pub fn phys(&self) -> PhysAddr {
        self.phys
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The CPU's view of the region. The device may write it concurrently (DMA), so drivers
    /// read descriptors with [`DmaRegion::read_volatile_u64`] and friends, not through this.
    pub fn as_ptr(&self) -> *mut u8 {
        self.virt.as_ptr()
    }

    /// The region as a byte slice, for buffers the device is not currently using.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: from_raw's contract: `len` valid, initialised bytes owned by this region.
        unsafe { core::slice::from_raw_parts(self.virt.as_ptr(), self.len) }
    }

    /// The region as a mutable byte slice, for buffers the device is not currently using.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: from_raw's contract, and `&mut self` makes the borrow exclusive on the CPU side.
        unsafe { core::slice::from_raw_parts_mut(self.virt.as_ptr(), self.len) }
    }

    /// Volatile read of a little-endian u64 at `offset` (descriptor fields the device writes).
    /// Returns `None` when the access would leave the region.
    pub fn read_volatile_u64(&self, offset: usize) -> Option<u64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds and 8-byte aligned relative to a page-aligned (or heap-aligned to 8)
        // base, checked above; volatile because the device writes it behind the compiler's back.
        Some(u64::from_le(unsafe {
            core::ptr::read_volatile(self.virt.as_ptr().add(offset).cast::<u64>())
        }))
    }

    /// Volatile write of a little-endian u64 at `offset`. Returns `false` when out of bounds.
    pub fn write_volatile_u64(&mut self, offset: usize, value: u64) -> bool {
        if !offset.is_multiple_of(8) || offset.checked_add(8).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: in bounds and aligned, checked above.
        unsafe {
            core::ptr::write_volatile(self.virt.as_ptr().add(offset).cast::<u64>(), value.to_le())
        };
        true
    }
}

impl DmaRegion {
    /// Copies `buffer.len()` bytes starting at `offset` out of the region (shared-ring data the
    /// device may write at other offsets concurrently). Returns `false`, copying nothing, when
    /// the range leaves the region.
    pub fn read_bytes(&self, offset: usize, buffer: &mut [u8]) -> bool {
        if offset
            .checked_add(buffer.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: `[offset, offset + len)` lies inside the region (checked above), which from_raw
        // guarantees valid for reads; `buffer` is a distinct Rust allocation, so no overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.virt.as_ptr().add(offset),
                buffer.as_mut_ptr(),
                buffer.len(),
            )
        };
        true
    }

    /// Copies `data` into the region at `offset`. Returns `false`, writing nothing, when the
    /// range leaves the region.
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > self.len)
        {
            return false;
        }
        // SAFETY: in bounds (checked above), valid for writes per from_raw, `&mut self` excludes
        // CPU-side borrows of the region, and `data` cannot overlap it while that borrow lives.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.virt.as_ptr().add(offset),
                data.len(),
            )
        };
        true
    }

    /// Atomic (sequentially consistent) load of the native-endian u32 at `offset`: a control
    /// word the device updates concurrently. `None` when out of bounds or not 4-byte aligned.
    pub fn load_u32(&self, offset: usize) -> Option<u32> {
        let pointer = self.u32_pointer(offset)?;
        // SAFETY: `u32_pointer` checked bounds and 4-byte alignment; the memory is valid for
        // the region's lifetime and only ever accessed atomically at this offset by both sides.
        Some(unsafe { core::sync::atomic::AtomicU32::from_ptr(pointer) }.load(SEQ_CST))
    }

    /// Atomic (sequentially consistent) store of a u32 control word at `offset`. Returns
    /// `false` when out of bounds or not 4-byte aligned.
    pub fn store_u32(&mut self, offset: usize, value: u32) -> bool {
        let Some(pointer) = self.u32_pointer(offset) else {
            return false;
        };
        // SAFETY: as in `load_u32`; `&mut self` excludes CPU-side slice borrows of the region.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(pointer) }.store(value, SEQ_CST);
        true
    }

    fn u32_pointer(&self, offset: usize) -> Option<*mut u32> {
        if offset.checked_add(4)? > self.len {
            return None;
        }
        let address = (self.virt.as_ptr() as usize).checked_add(offset)?;
        if !address.is_multiple_of(4) {
            return None;
        }
        Some(self.virt.as_ptr().wrapping_add(offset).cast::<u32>())
    }
}

const SEQ_CST: core::sync::atomic::Ordering = core::sync::atomic::Ordering::SeqCst;

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if let Some(release) = self.release {
            release(self.virt, self.phys, self.len);
        }
    }
}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion")
            .field("phys", &self.phys)
            .field("len", &self.len)
            .finish()
    }
}

/// Hands out DMA-able memory.
pub trait DmaAllocator {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two, at most 4096) that the
    /// device can reach. Returns `None` when memory is exhausted.
    fn allocate(&self, len: usize, align: usize) -> Option<DmaRegion>;
}

/// Link state as the bond sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LinkState {
    /// Carrier up and the device is ready to pass traffic.
    Up,
    /// Device present but no carrier (or the PF said the link went away).
    Down,
    /// The device is being reset or re-initialised (for example after a PF reset message);
    /// traffic must not be sent to it until it reports `Up` again.
    Resetting,
    /// The device is gone: it read back all-ones/zero, was unplugged or was disabled.
    Gone,
}

/// What a device can offload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Capabilities {
    /// Largest IP packet (not counting the Ethernet header) the device passes, e.g. 1500.
    pub mtu: usize,
    /// The device fills in TCP/UDP checksums on transmit when asked via [`TxMeta`].
    pub tx_checksum: bool,
    /// The device verifies TCP/UDP/IPv4 checksums on receive and says so per frame.
    pub rx_checksum: bool,
    /// Largest TCP segment the device can split (TSO); 0 when it cannot.
    pub max_tso_size: usize,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            mtu: 1500,
            tx_checksum: false,
            rx_checksum: false,
            max_tso_size: 0,
        }
    }
}

/// Per-frame receive information.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RxMeta {
    /// The device verified the L3/L4 checksums of this frame.
    pub checksum_verified: bool,
    /// The data was validated but the L4 checksum field holds only the pseudo-header sum
    /// (virtio-net NEEDS_CSUM left as it came): whoever checks that field must complete it.
    pub checksum_partial: bool,
}

/// Per-frame transmit requests, returned by the closure that writes the frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct TxMeta {
    /// Ask the device to compute the L4 checksum: `(start, offset)` = where the checksummed
    /// area starts in the frame and where the 16-bit checksum field is, relative to `start`.
    /// The field already holds the folded (not complemented) pseudo-header sum, whose length
    /// is the frame's whole L4 length, as Linux leaves it for CHECKSUM_PARTIAL. The IPv4 header
    /// checksum is already filled in.
    pub checksum: Option<(u16, u16)>,
    /// Ask the device to segment this TCP frame into segments carrying at most this many
    /// payload bytes (TSO). Only for frames longer than the MTU allows; `checksum` must be set.
    pub tso_mss: Option<u16>,
}

/// Counters every driver keeps. They only ever grow.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Frames handed to the stack.
    pub rx_frames: u64,
    /// Bytes of frames handed to the stack.
    pub rx_bytes: u64,
    /// Frames the device completed on transmit.
    pub tx_frames: u64,
    /// Bytes of frames completed on transmit.
    pub tx_bytes: u64,
    /// Received frames dropped because the device reported something impossible (a length
    /// beyond the buffer, a descriptor never posted, an error bit).
    pub rx_dropped_bad: u64,
    /// Transmit requests refused because the ring was full.
    pub tx_ring_full: u64,
    /// Interrupts handled.
    pub interrupts: u64,
    /// Good frames received as counted by the device's own hardware counters (0 when the
    /// device keeps none). Lets tests check the driver's view against the hardware's.
    pub hardware_rx_frames: u64,
    /// Good frames transmitted as counted by the device's own hardware counters (0 when none).
    pub hardware_tx_frames: u64,
}

/// Why a device operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeviceError {
    /// The device has been removed or reads back all-ones/zero.
    Gone,
    /// The transmit ring has no free slot right now.
    RingFull,
    /// The frame is larger than the device can send.
    FrameTooLarge {
        /// Requested frame length.
        len: usize,
        /// Largest frame the device takes.
        max: usize,
    },
    /// The device is not ready (link down, resetting, not initialised).
    NotReady,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::Gone => write!(f, "device gone"),
            DeviceError::RingFull => write!(f, "transmit ring full"),
            DeviceError::FrameTooLarge { len, max } => {
                write!(
                    f,
                    "frame of {len} bytes exceeds the device maximum of {max}"
                )
            }
            DeviceError::NotReady => write!(f, "device not ready"),
        }
    }
}

/// A network device as the stack and the bond drive it.
///
/// The datapath is non-blocking: nothing here waits for the device. `poll` does housekeeping
/// (reclaims completed transmit slots, refills receive rings, services the mailbox, notices link
/// changes and removal) and must be called whenever the device's interrupt fires or a deadline
/// passes.
pub trait NetDevice {
    /// Short name for logs, e.g. "virtio-net 00:03.0" or "igbvf 01:10.0".
    fn name(&self) -> &str;
    /// The MAC address frames are sent from and received for.
    fn mac_address(&self) -> MacAddress;
    /// What the device offloads.
    fn capabilities(&self) -> Capabilities;
    /// Current link state. Cheap: reads cached state updated by `poll`.
    fn link_state(&self) -> LinkState;
    /// Housekeeping; see the trait docs. `now_ns` is the monotonic clock.
    fn poll(&mut self, now_ns: u64);
    /// Hands up to `budget` received frames to `sink`, returning how many were delivered.
    /// Frames the device marked bad are dropped and counted, never delivered.
    fn receive(&mut self, budget: usize, sink: &mut dyn FnMut(&[u8], RxMeta)) -> usize;
    /// True when `transmit` would find a free slot.
    fn can_transmit(&self) -> bool;
    /// Queues one frame of `len` bytes, which `fill` writes into the device's buffer and
    /// returns the offloads the frame needs. The frame is not guaranteed to reach the wire until
    /// `flush` is called (drivers batch doorbells). A frame longer than the MTU allows is only
    /// accepted when [`Capabilities::max_tso_size`] covers it and `fill` asks for segmentation.
    fn transmit(
        &mut self,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> TxMeta,
    ) -> Result<(), DeviceError>;
    /// Rings the transmit doorbell for frames queued since the last flush.
    fn flush(&mut self);
    /// The caller found no work and is about to sleep until an interrupt or a deadline. A
    /// driver that masks its data interrupt while it is being polled (each interrupt costs an
    /// exit and an end-of-interrupt; a polled driver needs none) unmasks it here. Returns true
    /// when work arrived in between, so the caller polls again instead of sleeping.
    fn arm_interrupts(&mut self) -> bool {
        false
    }
    /// When the driver wants `poll` called even if no interrupt comes (a register check it
    /// deferred while busy); `None` = only on interrupts. The caller sleeps no longer than this.
    fn next_poll_ns(&self) -> Option<u64> {
        None
    }
    /// Counters.
    fn stats(&self) -> Stats;
    /// Stops the device so that no DMA is in flight afterwards (orderly removal).
    fn stop(&mut self);
    /// Tells the driver the device is gone (surprise removal noticed elsewhere, e.g. by the
    /// hot-plug controller): no more register access, report [`LinkState::Gone`].
    fn mark_gone(&mut self);
    /// True once each time the host asks the guest to announce its addresses (virtio-net's
    /// VIRTIO_NET_S_ANNOUNCE after a live migration). The stack then sends gratuitous ARP and
    /// unsolicited neighbour advertisements and calls [`NetDevice::announce_done`].
    fn take_announce_request(&mut self) -> bool {
        false
    }
    /// The announcement requested through [`NetDevice::take_announce_request`] went out.
    fn announce_done(&mut self) {}
    /// The host's steering between this synthetic NIC and its VF, where the host has one
    /// (Hyper-V's SWITCH_DATA_PATH: the VF carries traffic only after the host confirmed the
    /// switch). `None` (the default) where the VF being up is enough (KVM).
    fn host_data_path(&mut self) -> Option<&mut dyn HostDataPath> {
        None
    }
}

/// Which path the host steers a synthetic NIC's traffic to (Hyper-V data path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPath {
    /// The synthetic path (no switch requested, or the host moved traffic back).
    Synthetic,
    /// A switch to the VF was requested and its completion is awaited.
    SwitchingToVf,
    /// The host confirmed the switch: transmit may use the VF.
    Vf,
    /// A switch back was requested; the VF must no longer be used.
    SwitchingToSynthetic,
}

impl fmt::Display for HostPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostPath::Synthetic => "synthetic",
            HostPath::SwitchingToVf => "switching to vf",
            HostPath::Vf => "vf",
            HostPath::SwitchingToSynthetic => "switching to synthetic",
        })
    }
}

/// The host-side data-path switch of a synthetic NIC (see [`NetDevice::host_data_path`]).
pub trait HostDataPath {
    /// Where the host steers traffic now, as far as the guest knows.
    fn state(&self) -> HostPath;
    /// True while the host has a VF associated with this NIC (Hyper-V: VF association with
    /// `allocated = 1`).
    fn vf_associated(&self) -> bool;
    /// Asks the host to steer to the VF (`true`) or back to synthetic. Returns false when the
    /// request could not be sent now (no association, ring full, device gone): ask again later.
    fn request(&mut self, to_vf: bool) -> bool;
}
