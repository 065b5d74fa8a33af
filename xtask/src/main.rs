//! Project automation: `cargo xtask <command>` (see `cargo xtask --help`).

mod bench;
mod build;
mod demo;
mod fuzz;
mod interrupt;
mod setup;
mod test;
mod verifier_diff;
mod vm;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "portfwd development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (Debian packages, nightly rust-src, bpf-linker).
    Setup {
        /// Only report what is missing; exit 1 if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF object with nightly for bpfel-unknown-none.
    BuildEbpf {
        /// Use the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object, then the portfwd binary that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Formatting, clippy and the whole test suite (what CI runs), and beside it a subset
    /// of the integration tests on Debian 12's kernel 6.1 in a VM (root, x86_64).
    Test {
        /// Only run the integration test subset on this kernel series (booted
        /// with virtme-ng under TCG; installed from Debian's packages), e.g. 6.1
        #[arg(long, value_name = "SERIES")]
        kernel: Option<String>,
        /// Extra arguments for `cargo test`; a further `--` passes arguments to the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Walk through portfwd on a throwaway network namespace (needs root).
    Demo,
    /// Load the TC programs here and on another kernel (in a VM, as `test --kernel`), and
    /// report the conditional jumps that kernel's verifier removed and this one's kept.
    VerifierDiff {
        /// The other kernel's series, installed from Debian's packages.
        #[arg(long, value_name = "SERIES", default_value = vm::DEFAULT_KERNEL)]
        kernel: String,
    },
    /// Fuzz the parsers (cargo-fuzz on nightly), each target for a bounded time.
    Fuzz(fuzz::Args),
    /// Compare portfwd with direct routing, iptables, nftables and docker-proxy (needs root).
    Bench(bench::Args),
    /// The benchmark's own UDP client and server (run inside its namespaces).
    #[command(hide = true)]
    BenchTool {
        #[command(subcommand)]
        tool: bench::Tool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup { check: true } => setup::check(),
        Cmd::Setup { check: false } => setup::install(),
        Cmd::BuildEbpf { debug } => build::build_ebpf(!debug).map(|_| ()),
        Cmd::Build { release } => build::build(release).map(|_| ()),
        Cmd::Test { kernel, args } => test::test(kernel.as_deref(), &args),
        Cmd::Demo => demo::demo(),
        Cmd::VerifierDiff { kernel } => verifier_diff::verifier_diff(&kernel),
        Cmd::Fuzz(args) => fuzz::fuzz(args),
        Cmd::Bench(args) => bench::bench(args),
        Cmd::BenchTool { tool } => bench::run_tool(tool),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{ERROR_PREFIX} {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How xtask prints the error it exits with (the guest's runner reads it
/// in its process's output, `vm::Beside`).
const ERROR_PREFIX: &str = "xtask: error:";

/// The workspace root (xtask lives one level below it).
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the root) or
/// the root's `target`.
fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or(root().join("target"), |d| root().join(d))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where `cargo install` puts binaries; it may be missing from PATH (e.g. under sudo).
fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|d| d.join("bin"))
}

/// PATH with the cargo bin dir appended, so rustc finds a freshly installed bpf-linker.
fn path_with_cargo_bin() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(cargo_bin_dir());
    std::env::join_paths(dirs).unwrap_or_default()
}

/// The host (stable) cargo: the one that runs us, so `cargo +toolchain xtask` is honoured.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// A command for the nightly toolchain. `cargo xtask` runs under stable cargo, which
/// exports RUSTUP_TOOLCHAIN, RUSTC, etc.; left in place they silently override
/// `+nightly`, so strip everything that pins a toolchain or output location.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// `program arg1 arg2`, for messages.
fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio and fails unless it exits 0.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command quietly; true if it started and exited 0.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command and returns its stdout (stderr is inherited so errors stay visible).
fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", display(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_args_keep_the_second_separator() {
        let cli = Cli::parse_from(["xtask", "test", "--", "-p", "portfwd", "--", "--nocapture"]);
        let Cmd::Test { args, .. } = cli.command else {
            panic!("not the test command")
        };
        assert_eq!(args, ["-p", "portfwd", "--", "--nocapture"]);
    }
}
