//! Embeds portfwd's eBPF object.
//!
//! `cargo xtask build`/`test` build the object first and pass its path in
//! PORTFWD_EBPF_OBJ. Without it (a plain `cargo build` after `cargo xtask
//! setup`), `aya-build` builds the eBPF crate here, with nightly cargo for
//! the bpfel target. The eBPF crate has a workspace of its own (the host
//! workspace never compiles it for x86_64), so it is built from its own
//! directory, where `--package portfwd-ebpf` names it.

use std::{env, fs, path::PathBuf};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let embedded = out_dir.join("portfwd.bpf.o");
    println!("cargo:rerun-if-env-changed=PORTFWD_EBPF_OBJ");
    let object = match env::var_os("PORTFWD_EBPF_OBJ") {
        Some(path) => {
            let object = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", object.display());
            object
        }
        None => build_with_aya_build(&out_dir),
    };
    if let Err(error) = fs::copy(&object, &embedded) {
        panic!(
            "the eBPF object {} is missing ({error}): run `cargo xtask setup` once, \
             or build with `cargo xtask build`",
            object.display()
        );
    }
}

/// Builds the eBPF crate into `out_dir`; the object's path.
fn build_with_aya_build(out_dir: &std::path::Path) -> PathBuf {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../portfwd-ebpf");
    // aya-build watches the sources of the eBPF crate itself (root_dir);
    // these are its manifest and the ABI crate it depends on.
    for source in ["../portfwd-ebpf/Cargo.toml", "../portfwd-common/src"] {
        println!("cargo:rerun-if-changed={source}");
    }
    let sources = ebpf_dir.join("src");
    // This process is ours: its working directory decides which workspace
    // the nested cargo sees.
    env::set_current_dir(&ebpf_dir).expect("entering the eBPF crate");
    let package = aya_build::Package {
        name: "portfwd-ebpf",
        root_dir: sources.to_str().expect("a UTF-8 path"),
        ..Default::default()
    };
    if let Err(error) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        panic!(
            "building the eBPF crate failed ({error:#}): `cargo xtask setup` installs \
             what it needs (nightly with rust-src, bpf-linker)"
        );
    }
    // aya-build names the object after the crate's binary target.
    out_dir.join("portfwd")
}
