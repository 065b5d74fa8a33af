//! `cargo xtask build-ebpf` and `cargo xtask build`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::{cargo, nightly, root, run, setup, stdout_of};

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

/// The binaries `cargo test` of the workspace builds that `cargo xtask test`
/// runs on its own: the guest's two, and the CLI the bench's smoke runs.
pub(crate) struct TestBinaries {
    /// portfwd's integration tests (`tests/integration`).
    pub(crate) integration: PathBuf,
    /// portfwd's library unit tests (the packet cases).
    pub(crate) library: PathBuf,
    /// The `portfwd` CLI, a debug build.
    pub(crate) cli: PathBuf,
}

/// Builds what `cargo test --workspace` builds, with the eBPF object `obj`,
/// and names the binaries of `TestBinaries`. The whole workspace, as the
/// test run builds it: selecting one package (`-p portfwd`) resolves its
/// dependencies' features for it alone, and that recompiled aya and a dozen
/// crates (25 s in CI) for binaries the test run builds anyway; a release
/// build for the bench's smoke took a minute more.
pub(crate) fn test_binaries(obj: &Path) -> Result<TestBinaries> {
    let out = stdout_of(cargo().current_dir(root()).env(EBPF_OBJ_ENV, obj).args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json",
    ]))?;
    let (mut integration, mut library, mut cli) = (None, None, None);
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = message["executable"].as_str() else {
            continue;
        };
        let has_kind = |kind: &str| {
            message["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        };
        let test = message["profile"]["test"].as_bool() == Some(true);
        // Target names are unique in the workspace: portfwd's library and
        // binary are `portfwd` (the other libraries are `portfwd_common` and
        // `portfwd_testkit`), and only portfwd has a test target
        // `integration`. The binary comes twice: itself, and its unit tests.
        let slot = match message["target"]["name"].as_str() {
            Some("integration") if has_kind("test") => &mut integration,
            Some("portfwd") if has_kind("lib") => &mut library,
            Some("portfwd") if has_kind("bin") && !test => &mut cli,
            _ => continue,
        };
        *slot = Some(PathBuf::from(exe));
    }
    match (integration, library, cli) {
        (Some(integration), Some(library), Some(cli)) => Ok(TestBinaries {
            integration,
            library,
            cli,
        }),
        _ => bail!(
            "cargo test --workspace --no-run built no portfwd integration tests, library tests or CLI"
        ),
    }
}
