//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built by nightly cargo for another target, which a build
//! script cannot do cleanly inside the host build; xtask builds it first and
//! passes its path in PORTFWD_EBPF_OBJ (or it is found at its default path).

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=PORTFWD_EBPF_OBJ");
    let object = env::var_os("PORTFWD_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap())
                .join("../portfwd-ebpf/target/bpfel-unknown-none/release/portfwd")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("portfwd.bpf.o");
    if let Err(error) = fs::copy(&object, &out) {
        panic!(
            "the eBPF object {} is missing ({error}): build with `cargo xtask build` \
             (or run `cargo xtask build-ebpf` first)",
            object.display()
        );
    }
}
