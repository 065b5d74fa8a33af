//! `cargo xtask test`: everything CI checks, in order of increasing cost.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::build::{EBPF_OBJ_ENV, build_ebpf, test_binaries};
use crate::{cargo, is_root, nightly, root, run, setup, vm};

/// Set to skip the guest kernel tests of a full run (with a loud notice).
const SKIP_KERNEL_ENV: &str = "PORTFWD_SKIP_KERNEL_TESTS";

/// Where the metrics test finds promtool (`portfwd/tests/integration/serve.rs`).
const PROMTOOL_ENV: &str = "PORTFWD_PROMTOOL";

/// promtool, extracted from Debian's prometheus package (not installed: no
/// Prometheus server is needed); None, with a note, when it cannot be had.
fn promtool() -> Option<std::path::PathBuf> {
    if !is_root() {
        return None;
    }
    let dir = root().join("target/test-tools");
    match setup::file_from_deb("prometheus", "usr/bin/promtool", &dir) {
        Ok(path) => Some(path),
        Err(error) => {
            println!("note: no promtool ({error:#}); the metrics test uses its own parser only");
            None
        }
    }
}

/// `args` go to `cargo test`; anything after a further `--` goes to the test binaries.
/// With `kernel`, only the guest subset on that kernel series runs.
pub(crate) fn test(kernel: Option<&str>, args: &[String]) -> Result<()> {
    let obj = build_ebpf(true)?;
    if let Some(series) = kernel {
        return vm::test_kernel(series, &obj);
    }
    lint(&obj)?;
    if !is_root() {
        println!(
            "note: the integration tests need root (BPF, cgroups, network namespaces); \
             not root, so they will skip"
        );
    }
    // Full runs also test the oldest kernel CI covers, when this machine
    // can, beside the host's tests (`vm::Beside`).
    let guest = if args.is_empty() {
        Some(Guest::start()?)
    } else {
        None
    };
    // Nothing returns early while the guest runs: its result and output
    // come at the end, whatever the host's tests did.
    let host = host_tests(&obj, args);
    let guest = guest.map_or(Ok(()), Guest::finish);
    match (host, guest) {
        (Err(host), Err(guest)) => bail!("{host:#}; and {guest:#}"),
        (host, guest) => host.and(guest),
    }
}

/// The benchmark's smoke run (full runs as root only; before cargo test, so
/// that the test summary stays the last thing the host prints), then
/// `cargo test`.
fn host_tests(obj: &Path, args: &[String]) -> Result<()> {
    if is_root() && args.is_empty() {
        crate::bench::smoke(&test_binaries(obj)?.cli)?;
    }
    cargo_test(obj, args)
}

/// cargo at the workspace root, with the eBPF object `obj`: clippy and the
/// tests compile portfwd, whose build.rs embeds it.
fn cargo_in_root(obj: &Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(root()).env(EBPF_OBJ_ENV, obj);
    cmd
}

/// fmt and clippy, on the workspace and the eBPF crate.
fn lint(obj: &Path) -> Result<()> {
    let cargo_line = |line: &str| run(cargo_in_root(obj).args(line.split_whitespace()));
    cargo_line("fmt --all --check")?;
    // The eBPF crate is outside the workspace, so `--all` misses it. Stable rustfmt is fine.
    cargo_line("fmt --manifest-path portfwd-ebpf/Cargo.toml --check")?;
    cargo_line("clippy --workspace --all-targets -- -D warnings")?;
    // The eBPF crate too, with the toolchain and target it builds with.
    run(nightly("cargo")
        .current_dir(root().join("portfwd-ebpf"))
        .args([
            "clippy",
            "--quiet",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
}

/// `cargo test`, with `args` split at a further `--` between cargo and the
/// test binaries.
fn cargo_test(obj: &Path, args: &[String]) -> Result<()> {
    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    // The metrics test checks its scrape with the real promtool when it can.
    let promtool = promtool();
    // `--workspace` would override a `-p` given by the caller.
    let picks_package = cargo_args
        .iter()
        .any(|a| a.starts_with("-p") || a.starts_with("--package"));
    let scope = (!picks_package).then_some("--workspace");
    // The integration tests attach to the shared cgroup root: one at a time.
    let mut cargo_test = cargo_in_root(obj);
    if let Some(promtool) = &promtool {
        cargo_test.env(PROMTOOL_ENV, promtool);
    }
    run(cargo_test
        .arg("test")
        .args(scope)
        .args(cargo_args)
        .args(["--", "--test-threads=1"])
        .args(test_args))
}

/// The guest tests on the oldest kernel CI covers, in a full run.
enum Guest {
    Beside(vm::Beside),
    /// Why they cannot run on this machine (or were skipped).
    NotTested(String),
}

impl Guest {
    /// Starts the guest tests when this machine can run them.
    fn start() -> Result<Guest> {
        let skipped = std::env::var_os(SKIP_KERNEL_ENV)
            .map(|_| format!("{SKIP_KERNEL_ENV} is set"))
            .or_else(vm::cannot_run);
        Ok(match skipped {
            Some(reason) => Guest::NotTested(reason),
            None => Guest::Beside(vm::Beside::start(vm::DEFAULT_KERNEL)?),
        })
    }

    /// Their result, or a loud notice, last, that they did not run.
    fn finish(self) -> Result<()> {
        let series = vm::DEFAULT_KERNEL;
        match self {
            Guest::Beside(guest) => guest.finish(),
            Guest::NotTested(reason) => {
                vm::loud_notice(&[
                    format!(
                        "NOT TESTED: kernel {series} (Debian 12). The guest tests did not run: {reason}."
                    ),
                    format!(
                        "Run them with `cargo xtask test --kernel {series}` as root on x86_64 Debian."
                    ),
                ]);
                Ok(())
            }
        }
    }
}
