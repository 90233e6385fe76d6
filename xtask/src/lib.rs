//! Tandem's developer tasks and QEMU test harness: build images, boot them, talk QMP, benchmark.
//!
//! The `xtask` binary (`cargo xtask ...`) is a thin command-line layer over this library; the
//! `tandem-tests` crate uses [`qemu::QemuBuilder`], [`qmp::Qmp`] and [`image::build_app`] to
//! boot the images in its integration tests.

pub mod accel;
pub mod bench;
pub mod bench_echo;
pub mod bench_failover;
pub mod bench_iperf;
pub mod bench_namespace;
pub mod bench_openvmm;
pub mod cli;
pub mod conformance;
pub mod digest;
pub mod disk_image;
pub mod error;
pub mod exit;
pub mod fuzz;
pub mod image;
pub mod linux_guest;
pub mod machine;
pub mod nested;
pub mod openvmm;
pub mod openvmm_run;
pub mod qemu;
pub mod qmp;
pub mod tools;
pub mod vf;

pub use accel::{Accel, AccelChoice};
pub use error::{Error, Result};
pub use exit::QemuExit;
pub use image::{Profile, build_app};
pub use qemu::{Qemu, QemuBuilder, SerialLine};
pub use qmp::Qmp;
