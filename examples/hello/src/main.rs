//! The `hello` app: prints the kernel command line and the PCI device tree, then exits 0.
//!
//! Test hooks on the command line: `hello.crash=panic` and `hello.crash=pagefault` end the VM
//! the hard way; `hello.stay=1` keeps it running and servicing PCIe hot-plug events.
#![no_std]
#![no_main]

extern crate alloc;

use guest_kernel::println;

guest_kernel::app!(main);

fn main() -> i32 {
    println!("cmdline: {}", guest_kernel::cmdline());
    match guest_kernel::cmdline_value("hello.crash") {
        Some("panic") => panic!("deliberate panic requested by hello.crash=panic"),
        Some("pagefault") => {
            // A deliberate read of an unmapped address: the kernel must report the page fault.
            let value = guest_kernel::diagnostics::probe_read(0x7fff_dead_0000);
            println!("read {value:#x} from an unmapped address?!");
            return 1;
        }
        Some(other) => println!("hello: unknown hello.crash value {other:?}"),
        None => {}
    }
    if let Some(milliseconds) =
        guest_kernel::cmdline_value("hello.sleep_ms").and_then(|v| v.parse::<u64>().ok())
    {
        let start = guest_kernel::time::now_ns();
        guest_kernel::time::sleep_until(start + milliseconds * 1_000_000);
        let slept = guest_kernel::time::now_ns() - start;
        println!(
            "hello: slept {} us (asked for {milliseconds} ms)",
            slept / 1000
        );
    }
    let pci = match guest_kernel::pci::init() {
        Ok(pci) => pci,
        Err(error) => {
            println!("hello: PCI initialisation failed: {error}");
            return 1;
        }
    };
    let mut tree = alloc::string::String::new();
    let _ = pci.print_tree(&mut tree);
    guest_kernel::print!("{tree}");
    if guest_kernel::cmdline_value("hello.stay").is_some() {
        println!("hello: waiting for hot-plug events");
        let mut pci = pci;
        loop {
            for event in pci.service() {
                log::info!("hello: {event:?}");
            }
            let now = guest_kernel::time::now_ns();
            guest_kernel::time::wait_for_event(Some(now + 1_000_000_000));
        }
    }
    println!("hello: done");
    0
}
