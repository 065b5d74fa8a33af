//! `cargo xtask build-ebpf` and `cargo xtask build`.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::{cargo, nightly, root, run, setup};

/// The env var portfwd's build.rs reads to embed the eBPF object.
pub(crate) const EBPF_OBJ_ENV: &str = "PORTFWD_EBPF_OBJ";

/// Builds the eBPF crate and returns the absolute path of the object.
pub(crate) fn build_ebpf(release: bool) -> Result<PathBuf> {
    setup::install()?;
    let dir = root().join("portfwd-ebpf");
    let mut cmd = nightly("cargo");
    cmd.current_dir(&dir)
        .args([
            "build",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        // BTF and debuginfo make verifier logs point at Rust source lines. With --target
        // set, RUSTFLAGS applies to the eBPF code only, not to host build scripts.
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    if release {
        cmd.arg("--release");
    }
    println!("building the eBPF programs (nightly, bpfel; half a minute from clean)");
    run(cmd.arg("--quiet"))?;
    // The crate's binary target is named `portfwd`.
    let profile = if release { "release" } else { "debug" };
    let obj = dir
        .join("target/bpfel-unknown-none")
        .join(profile)
        .join("portfwd");
    if !obj.is_file() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    println!("eBPF object: {}", obj.display());
    Ok(obj)
}

/// Builds the eBPF object (always release: it has to pass the verifier) and then the
/// `portfwd` binary embedding it. Returns the eBPF object's path.
pub(crate) fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf(true)?;
    let mut cmd = cargo();
    cmd.current_dir(root())
        .args(["build", "-p", "portfwd"])
        .env(EBPF_OBJ_ENV, &obj);
    if release {
        cmd.arg("--release");
    }
    println!("building portfwd");
    run(cmd.arg("--quiet"))?;
    Ok(obj)
}
