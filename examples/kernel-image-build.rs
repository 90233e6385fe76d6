// Shared build script of every app image (included by each app's build.rs): links the binary as
// a freestanding kernel. The flags apply to this package's binaries only, so host builds and
// tests of the library crates stay ordinary.
fn main() {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let script = manifest.join("../../guest-kernel/link.ld");
    let script = script.canonicalize().expect("guest-kernel/link.ld exists");
    for argument in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,--no-eh-frame-hdr",
    ] {
        println!("cargo:rustc-link-arg-bins={argument}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=../kernel-image-build.rs");
}
