//! Tandem's guest kernel: boot, CPU, memory, interrupts, time, PCI/PCIe and console.
//!
//! The kernel is a library linked into each app image. An app provides its entry point with
//! [`app!`]; the kernel boots (PVH or Multiboot2), brings up memory, interrupts, the clock and
//! ACPI, then calls it and turns its return value into the VM's exit code.
#![cfg_attr(not(any(test, feature = "host")), no_std)]

extern crate alloc;

pub mod acpi;
#[cfg(not(any(test, feature = "host")))]
pub mod arch;
pub mod boot;
#[cfg(not(any(test, feature = "host")))]
pub mod console;
#[cfg(not(any(test, feature = "host")))]
pub mod diagnostics;
pub mod error;
#[cfg(not(any(test, feature = "host")))]
pub mod exit;
pub mod hyperv;
#[cfg(not(any(test, feature = "host")))]
pub mod interrupts;
pub mod mm;
#[cfg(not(any(test, feature = "host")))]
pub mod net;
pub mod pci;
pub mod pending_vectors;
pub mod pvclock;
#[cfg(not(any(test, feature = "host")))]
mod rt;
#[cfg(not(any(test, feature = "host")))]
pub mod time;

pub use error::KernelError;

#[cfg(not(any(test, feature = "host")))]
pub use kernel::*;

#[cfg(not(any(test, feature = "host")))]
mod kernel {
    use spin::Once;

    use crate::boot::{self, BootInfo, RegionKind};
    use crate::mm::{self, PhysRange, heap, paging};
    use crate::{acpi, arch, console, exit, interrupts, time};

    /// Exit code when the boot loader's information is unusable.
    pub const BAD_BOOT_EXIT_CODE: i32 = 103;

    static BOOT_INFO: Once<BootInfo> = Once::new();

    unsafe extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
        /// The page below the boot stack, left unmapped so an overflow faults.
        static tandem_boot_stack_guard: u8;
    }

    unsafe extern "Rust" {
        /// Defined by the app through [`crate::app!`].
        fn tandem_app_main() -> i32;
    }

    /// Declares the app's entry point: `guest_kernel::app!(main);` with `fn main() -> i32`.
    #[macro_export]
    macro_rules! app {
        ($main:path) => {
            #[unsafe(no_mangle)]
            fn tandem_app_main() -> i32 {
                $main()
            }
        };
    }

    /// The kernel command line.
    pub fn cmdline() -> &'static str {
        BOOT_INFO.get().map_or("", BootInfo::cmdline)
    }

    /// `key=value` from the command line (`Some("")` for a bare `key`).
    pub fn cmdline_value(key: &str) -> Option<&'static str> {
        boot::cmdline_value(cmdline(), key)
    }

    /// The boot information.
    pub fn boot_info() -> Option<&'static BootInfo> {
        BOOT_INFO.get()
    }

    /// Reads physical memory through the boot trampoline's identity map of the first 4 GiB.
    fn read_boot_memory(address: u64, buffer: &mut [u8]) -> bool {
        let Some(end) = address.checked_add(buffer.len() as u64) else {
            return false;
        };
        if address == 0 || end > 1 << 32 {
            return false;
        }
        // SAFETY: the boot page tables identity-map 0..4 GiB and the loader placed its
        // structures in RAM there; we only read.
        unsafe {
            core::ptr::copy_nonoverlapping(address as *const u8, buffer.as_mut_ptr(), buffer.len())
        };
        true
    }

    fn init_memory(boot: &BootInfo) -> Result<(u64, u64), crate::KernelError> {
        // Linker-script symbols: only their addresses are used.
        let kernel = PhysRange {
            start: core::ptr::addr_of!(__kernel_start) as u64,
            end: core::ptr::addr_of!(__kernel_end) as u64,
        };
        let low_memory = PhysRange {
            start: 0,
            end: 0x10_0000,
        };
        let mut usable = mm::usable_ranges(boot.regions(), &[low_memory, kernel]);
        let total = usable.total();
        let pool_size = mm::frame_pool_size(total);
        let pool = usable
            .as_slice()
            .iter()
            .filter(|range| range.start < 1 << 32)
            .map(|range| PhysRange {
                start: range.start,
                end: range.end.min(1 << 32),
            })
            .max_by_key(PhysRange::len)
            .ok_or(crate::KernelError::OutOfMemory {
                purpose: "frame pool",
            })?;
        let pool = PhysRange {
            start: pool.start,
            end: pool.start + pool_size.min(pool.len()),
        };
        usable.remove(pool);
        let mut frames = heap::FRAMES.lock();
        frames.init(pool.start, pool.len());

        let mut mapped = mm::heapless_ranges::Ranges::new();
        mapped.push(PhysRange {
            start: 0x1000,
            end: 0x10_0000,
        });
        mapped.push(kernel);
        for region in boot.regions() {
            if matches!(
                region.kind,
                RegionKind::Usable | RegionKind::AcpiReclaimable | RegionKind::AcpiNvs
            ) {
                mapped.push(PhysRange {
                    start: region.start / mm::PAGE_SIZE * mm::PAGE_SIZE,
                    end: region.end().div_ceil(mm::PAGE_SIZE) * mm::PAGE_SIZE,
                });
            }
        }
        mapped.remove(PhysRange {
            start: 0,
            end: 0x1000,
        });
        // A stack overflow must fault, not silently overwrite the statics below the stack.
        let guard = core::ptr::addr_of!(tandem_boot_stack_guard) as u64;
        mapped.remove(PhysRange {
            start: guard,
            end: guard + mm::PAGE_SIZE,
        });
        // SAFETY: `mapped` covers the kernel image (stacks, statics) and all usable RAM,
        // which includes the frame pool; this runs once.
        unsafe { paging::init(mapped.as_slice(), &mut frames)? };
        drop(frames);
        paging::grow_emulated_tlb(mapped.as_slice());
        let mut heap_bytes = 0;
        for range in usable.as_slice() {
            // SAFETY: usable RAM, now mapped, owned by nobody else (the pool, the kernel and
            // the first MiB were removed from `usable`).
            if unsafe { heap::add_heap_range(*range) } {
                heap_bytes += range.len();
            }
        }
        Ok((pool.len(), heap_bytes))
    }

    #[unsafe(no_mangle)]
    extern "C" fn tandem_kernel_entry(magic: u32, info: u32) -> ! {
        time::mark_boot();
        console::init();
        // COM2 (the lab control channel, when the VM has one) gets its FIFO now, so commands
        // sent as soon as the app says it is ready are buffered whole.
        console::init_control_port();
        interrupts::init();
        let boot = match BootInfo::parse(magic, u64::from(info), &read_boot_memory) {
            Ok(boot) => BOOT_INFO.call_once(|| boot),
            Err(error) => {
                console::emergency_print(format_args!(
                    "boot: unusable boot information: {error}\n"
                ));
                exit::exit(BAD_BOOT_EXIT_CODE);
            }
        };
        let (pool_bytes, heap_bytes) = match init_memory(boot) {
            Ok(sizes) => sizes,
            Err(error) => {
                console::emergency_print(format_args!("boot: memory set-up failed: {error}\n"));
                exit::exit(BAD_BOOT_EXIT_CODE);
            }
        };
        let legacy_pics =
            arch::apic::init(interrupts::SPURIOUS_VECTOR, interrupts::PIC_BASE_VECTOR);
        let clock = time::init();
        console::init_logging(boot::cmdline_value(boot.cmdline(), "log"));
        log::info!(
            "Tandem guest kernel {} booted via {}: {} KiB heap, {} KiB DMA pool, TSC {} MHz ({})",
            env!("CARGO_PKG_VERSION"),
            boot.protocol,
            heap_bytes / 1024,
            pool_bytes / 1024,
            time::tsc_frequency() / 1_000_000,
            clock
        );
        if boot.dropped_regions > 0 {
            log::warn!("boot: {} memory map entries ignored", boot.dropped_regions);
        }
        if clock.source == time::ClockSource::Assumed {
            log::warn!(
                "clock: no PIT and no CPUID or hypervisor frequency: assuming a {} MHz TSC",
                time::tsc_frequency() / 1_000_000
            );
        }
        if let Some(hyper_v) = crate::hyperv::detect() {
            log::info!(
                "Hyper-V detected (build {}, version {}.{}, privileges {:#x}, VMBus {})",
                hyper_v.build,
                hyper_v.major,
                hyper_v.minor,
                hyper_v.privileges.bits(),
                if hyper_v.has_vmbus() {
                    "allowed"
                } else {
                    "not allowed"
                }
            );
        }
        if !legacy_pics {
            log::info!("no legacy 8259 PICs: nothing to mask");
        }
        acpi::init(boot.rsdp);
        arch::cpu::enable_interrupts();
        // SAFETY: every app defines `tandem_app_main` through `app!`, with this signature.
        let code = unsafe { tandem_app_main() };
        log::info!("app exited with code {code}");
        exit::exit(code)
    }
}
