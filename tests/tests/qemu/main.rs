//! QEMU integration tests: the harness against real QEMU, then the `hello` image.

mod harness;
mod hello;
mod hotplug;
