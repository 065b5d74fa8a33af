//! `cargo xtask setup`: check every prerequisite cheaply, install only what is missing.
//! Silent when everything is present, so other commands can call it on every run.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cargo_bin_dir, is_root, run, stdout_of, succeeds};

/// llvm/polly/zstd/zlib are for building bpf-linker; the rest are used by the demo,
/// the integration tests, or for debugging.
const DEBS: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "curl",
    "python3",
    "ethtool",
    "bpftool",
    "iptables",
    "nftables",
    // The CNI plugin's tests: the reference plugins (bridge, host-local),
    // podman on runc (crun refuses hybrid cgroups), a busybox root filesystem.
    "containernetworking-plugins",
    "podman",
    "runc",
    "busybox-static",
    // The Docker test: a private dockerd (with containerd) whose userland
    // proxy is portfwd. Installing it starts no daemon (runlevel 1, below).
    "docker.io",
];

#[derive(Default)]
struct Missing {
    debs: Vec<&'static str>,
    nightly: bool,
    rust_src: bool,
    /// rustfmt/clippy of the host toolchain, needed by `cargo xtask test`.
    host_components: Vec<&'static str>,
    bpf_linker: bool,
}

impl Missing {
    fn find() -> Result<Self> {
        let mut m = Missing {
            debs: missing_debs(DEBS)?,
            ..Default::default()
        };
        let toolchains = stdout_of(Command::new("rustup").args(["toolchain", "list"]))?;
        // `rustup run nightly` needs `nightly-<host>`; a dated nightly does not count.
        let is_nightly = |l: &str| {
            l.strip_prefix("nightly-")
                .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        };
        m.nightly = !toolchains.lines().any(is_nightly);
        if !m.nightly {
            let list = "component list --toolchain nightly --installed";
            let installed = stdout_of(Command::new("rustup").args(list.split(' ')))?;
            m.rust_src = !installed.lines().any(|l| l.trim() == "rust-src");
        }
        // No --toolchain: rustup resolves the toolchain that runs us (RUSTUP_TOOLCHAIN).
        let host = stdout_of(Command::new("rustup").args(["component", "list", "--installed"]))?;
        m.host_components = ["rustfmt", "clippy"]
            .into_iter()
            .filter(|c| !host.lines().any(|l| l.starts_with(c)))
            .collect();
        m.bpf_linker = !bpf_linker_works();
        Ok(m)
    }

    fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.debs.is_empty() {
            out.push(format!("Debian packages: {}", self.debs.join(" ")));
        }
        if self.nightly {
            out.push("the nightly Rust toolchain (with rust-src)".into());
        }
        if self.rust_src {
            out.push("rust-src for the nightly toolchain".into());
        }
        if !self.host_components.is_empty() {
            out.push(format!(
                "host toolchain components: {}",
                self.host_components.join(" ")
            ));
        }
        if self.bpf_linker {
            out.push("bpf-linker".into());
        }
        out
    }
}

/// Asks dpkg for all packages at once; absent packages simply produce no "installed" line.
pub fn missing_debs(debs: &[&'static str]) -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(debs)
        .output()
        .context("cannot run dpkg-query (setup supports Debian-based systems only)")?;
    // dpkg-query exits 1 when some package is unknown, so read stdout regardless.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .collect();
    Ok(debs
        .iter()
        .copied()
        .filter(|d| !installed.contains(d))
        .collect())
}

/// Installs Debian packages as root (`what` names them in messages).
fn apt_install(what: &str, debs: &[&str]) -> Result<()> {
    apt_install_logged(what, debs, None)
}

/// `apt_install`, with apt's output going to `log` when given (one line on
/// the console instead of a screenful).
pub fn apt_install_logged(what: &str, debs: &[&str], log: Option<&std::path::Path>) -> Result<()> {
    let list = debs.join(" ");
    if !is_root() {
        bail!(
            "missing {what}, and installing them needs root:\n  \
             sudo apt-get install -y --no-install-recommends {list}"
        );
    }
    match log {
        Some(log) => println!("setup: installing {what}: {list} (log: {})", log.display()),
        None => println!("setup: installing {what}: {list}"),
    }
    let logged = |cmd: &mut Command| -> Result<()> {
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        run(cmd)
    };
    // Wait for a concurrent apt/dpkg instead of failing on its lock.
    let lock = ["-o", "DPkg::Lock::Timeout=600"];
    logged(Command::new("apt-get").args(lock).arg("update"))?;
    logged(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            // invoke-rc.d starts no service in runlevel 1: packages such as
            // nginx-light must not come up on the machine's own ports.
            .env("RUNLEVEL", "1")
            .args(lock)
            .args(["install", "-y", "--no-install-recommends"])
            .args(debs),
    )
}

/// bpf-linker from PATH or from cargo's bin dir (which PATH may lack, e.g. under sudo).
fn bpf_linker_works() -> bool {
    let in_cargo_bin = cargo_bin_dir().map(|d| d.join("bpf-linker"));
    succeeds(Command::new("bpf-linker").arg("--version"))
        || in_cargo_bin.is_some_and(|p| succeeds(Command::new(p).arg("--version")))
}

/// `cargo xtask setup --check`
pub fn check() -> Result<()> {
    let missing = Missing::find()?.describe();
    if missing.is_empty() {
        println!("setup: all prerequisites present");
        return Ok(());
    }
    for item in &missing {
        println!("missing: {item}");
    }
    bail!("prerequisites missing; run `cargo xtask setup`")
}

/// `cargo xtask setup`, also run (quietly) before every build.
pub fn install() -> Result<()> {
    let m = Missing::find()?;
    if !m.debs.is_empty() {
        apt_install("Debian packages", &m.debs)?;
    }
    if m.nightly {
        println!("setup: installing the nightly toolchain");
        let install = "toolchain install nightly --profile minimal -c rust-src";
        run(Command::new("rustup").args(install.split(' ')))
            .context("the nightly toolchain is missing and could not be installed")?;
    } else if m.rust_src {
        println!("setup: adding rust-src to nightly (the eBPF build rebuilds core)");
        let add = "component add rust-src --toolchain nightly";
        run(Command::new("rustup").args(add.split(' ')))?;
    }
    if !m.host_components.is_empty() {
        println!("setup: adding {}", m.host_components.join(" "));
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(&m.host_components))?;
    }
    if m.bpf_linker {
        println!("setup: installing bpf-linker (about a minute)");
        // bpf-linker defaults to LLVM 23; we have 22. Without LLVM_PREFIX it picks the
        // unversioned llvm-config on PATH (LLVM 14) and fails to link.
        run(cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--locked", "--no-default-features"])
            .args(["--features", "llvm-22"]))?;
        if !bpf_linker_works() {
            bail!("bpf-linker was installed but does not run");
        }
    }
    Ok(())
}

/// What `cargo xtask bench` runs besides the above: load generators, the
/// HTTP server, and a font for the chart. (docker-proxy is not installed: the
/// bench extracts it from the docker.io package.)
const BENCH_DEBS: &[&str] = &[
    "iperf3",
    "wrk",
    "nginx-light",
    "fonts-dejavu-core",
    "iptables",
    "nftables",
    "iproute2",
    "curl",
    "bpftool",
];

/// Installs the benchmark's Debian packages that are missing.
pub fn install_bench_debs() -> Result<()> {
    let missing = missing_debs(BENCH_DEBS)?;
    if missing.is_empty() {
        return Ok(());
    }
    apt_install("the benchmark's Debian packages", &missing)
}
