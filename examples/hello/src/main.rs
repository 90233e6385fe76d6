//! The `hello` app: prints the kernel command line and the PCI device tree, then exits 0.
//!
//! Test hooks on the command line: `hello.crash=panic` and `hello.crash=pagefault` end the VM
//! the hard way; `hello.stay=1` keeps it running and servicing PCIe hot-plug events.
#![no_std]
#![no_main]

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
    println!("hello: done");
    0
}
