include!("../kernel-image-build.rs");
