//! `cargo xtask setup`: check every prerequisite cheaply, install only what is missing.
//! Silent when everything is present, so other commands can call it on every run;
//! otherwise a few lines on the terminal, and the full output in a log file it names.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, cargo_bin_dir, display, is_root, root, run, stdout_of, succeeds};

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
    // Rootless namespaces (issue 15's tests and `bench --rootless`):
    // RootlessKit with slirp4netns, and newuidmap/newgidmap.
    "rootlesskit",
    "slirp4netns",
    "uidmap",
];

#[derive(Default)]
struct Missing {
    debs: Vec<&'static str>,
    nightly: bool,
    rust_src: bool,
    /// rustfmt/clippy of the host toolchain, needed by `cargo xtask test`.
    host_components: Vec<&'static str>,
    bpf_linker: bool,
    /// `/dev/net/tun` not usable by unprivileged users (slirp4netns opens it
    /// inside the rootless tests' user namespaces).
    tun_closed: bool,
}

/// The tun device, which Debian's udev rule (`50-udev-default.rules`) makes
/// 0666; a machine whose /dev was made without udev may have it 0600.
const TUN: &str = "/dev/net/tun";

fn tun_is_closed() -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(TUN).is_ok_and(|meta| meta.permissions().mode() & 0o006 != 0o006)
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
        m.tun_closed = tun_is_closed();
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
        if self.tun_closed {
            out.push(format!(
                "{TUN} usable by users (mode 0666, as udev sets it)"
            ));
        }
        out
    }
}

/// Asks dpkg for all packages at once; absent packages simply produce no "installed" line.
pub(crate) fn missing_debs(debs: &[&'static str]) -> Result<Vec<&'static str>> {
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
fn apt_install(what: &str, debs: &[&str], log: &mut Log) -> Result<()> {
    let list = debs.join(" ");
    if !is_root() {
        bail!(
            "missing {what}, and installing them needs root:\n  \
             sudo apt-get install -y --no-install-recommends {list}"
        );
    }
    // Wait for a concurrent apt/dpkg instead of failing on its lock.
    let lock = ["-o", "DPkg::Lock::Timeout=600"];
    log.step(
        "updating the package lists",
        Command::new("apt-get").args(lock).arg("update"),
    )?;
    log.step(
        &format!("installing {what}: {list}"),
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

/// `apt_install` with the output in `log` (setup's own log when None).
pub(crate) fn apt_install_logged(what: &str, debs: &[&str], log: Option<&Path>) -> Result<()> {
    let mut log = match log {
        Some(path) => Log {
            path: path.to_owned(),
        },
        None => Log::open()?,
    };
    apt_install(what, debs, &mut log)
}

/// The full output of what setup runs goes to a log file; the terminal gets
/// one line per step, a progress line while a step runs, and the log's
/// last lines if a step fails.
struct Log {
    path: PathBuf,
}

/// How often a running step says it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

impl Log {
    fn open() -> Result<Self> {
        let path = root().join("target/xtask-setup.log");
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Log { path })
    }

    /// Runs `cmd` with its output appended to the log.
    fn step(&mut self, what: &str, cmd: &mut Command) -> Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let mut header = file.try_clone()?;
        writeln!(header, "\n==> {what}\n$ {}", display(cmd))?;
        println!("setup: {what}");
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start `{}`", display(cmd)))?;
        let mut next_note = PROGRESS_EVERY;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() >= next_note {
                println!("setup:   ... {}s", next_note.as_secs());
                next_note += PROGRESS_EVERY;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !status.success() {
            self.show_tail(20);
            bail!(
                "`{}` failed ({status}); the full log is {}",
                display(cmd),
                self.path.display()
            );
        }
        println!("setup:   done in {}s", start.elapsed().as_secs());
        Ok(())
    }

    /// Prints the last `lines` lines of the log.
    fn show_tail(&self, lines: usize) {
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        for line in &all[all.len().saturating_sub(lines)..] {
            eprintln!("  | {line}");
        }
    }
}

/// bpf-linker from PATH or from cargo's bin dir (which PATH may lack, e.g. under sudo).
fn bpf_linker_works() -> bool {
    let in_cargo_bin = cargo_bin_dir().map(|d| d.join("bpf-linker"));
    succeeds(Command::new("bpf-linker").arg("--version"))
        || in_cargo_bin.is_some_and(|p| succeeds(Command::new(p).arg("--version")))
}

/// `cargo xtask setup --check`
pub(crate) fn check() -> Result<()> {
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

/// `cargo xtask setup`, also run (silently, when nothing is missing) before
/// every build.
pub(crate) fn install() -> Result<()> {
    let m = Missing::find()?;
    let missing = m.describe();
    if missing.is_empty() {
        return Ok(());
    }
    let mut log = Log::open()?;
    println!(
        "setup: installing what is missing (a few minutes on a fresh machine; \
         the full log is {}):",
        log.path.display()
    );
    for item in &missing {
        println!("setup:   - {item}");
    }
    if !m.debs.is_empty() {
        apt_install("Debian packages", &m.debs, &mut log)?;
    }
    install_toolchain(&m, &mut log)?;
    if m.bpf_linker {
        // bpf-linker defaults to LLVM 23; we have 22. Without LLVM_PREFIX it picks the
        // unversioned llvm-config on PATH (LLVM 14) and fails to link.
        log.step(
            "building bpf-linker (about two minutes)",
            cargo()
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args(["install", "bpf-linker", "--locked", "--no-default-features"])
                .args(["--features", "llvm-22"]),
        )?;
        if !bpf_linker_works() {
            bail!("bpf-linker was installed but does not run");
        }
    }
    if m.tun_closed {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(TUN, fs::Permissions::from_mode(0o666))
            .with_context(|| format!("making {TUN} usable by users (chmod 0666)"))?;
    }
    println!("setup: everything is installed");
    Ok(())
}

/// The nightly toolchain with rust-src, and the host's rustfmt and clippy.
fn install_toolchain(m: &Missing, log: &mut Log) -> Result<()> {
    if m.nightly {
        let install = "toolchain install nightly --profile minimal -c rust-src";
        log.step(
            "installing the nightly toolchain (about a minute)",
            Command::new("rustup").args(install.split(' ')),
        )
        .context("the nightly toolchain is missing and could not be installed")?;
    } else if m.rust_src {
        let add = "component add rust-src --toolchain nightly";
        log.step(
            "adding rust-src to nightly (the eBPF build rebuilds core)",
            Command::new("rustup").args(add.split(' ')),
        )?;
    }
    if !m.host_components.is_empty() {
        log.step(
            &format!("adding {}", m.host_components.join(" ")),
            Command::new("rustup")
                .args(["component", "add"])
                .args(&m.host_components),
        )?;
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
    // --rootless: RootlessKit's builtin port driver over slirp4netns, and
    // pasta (from passt).
    "rootlesskit",
    "slirp4netns",
    "uidmap",
    "passt",
];

/// Installs the benchmark's Debian packages that are missing.
pub(crate) fn install_bench_debs() -> Result<()> {
    let missing = missing_debs(BENCH_DEBS)?;
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(
        "the benchmark's Debian packages",
        &missing,
        &mut Log::open()?,
    )
}

/// One file of a Debian package, extracted (not installed) under
/// `dir/<package>/`: the real docker-proxy for the bench, promtool for the
/// metrics test, without their daemons.
pub(crate) fn file_from_deb(package: &str, file: &str, dir: &Path) -> Result<PathBuf> {
    let bin = dir.join(package).join(file);
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(dir)?;
    println!("extracting {file} from Debian's {package} package");
    let download = || {
        Command::new("apt-get")
            .current_dir(dir)
            .args(["-o", "DPkg::Lock::Timeout=600", "download", package])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
        if !download() {
            bail!("`apt-get download {package}` failed");
        }
    }
    let deb = newest_deb(dir, package)?;
    run(Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join(package)))?;
    if !bin.is_file() {
        bail!("{} has no {file}", deb.display());
    }
    Ok(bin)
}

/// The newest `<package>_*.deb` that `apt-get download` left in `dir`.
pub(crate) fn newest_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .max()
        .with_context(|| format!("apt-get download left no {prefix}*.deb"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_names_its_log_which_has_the_output() {
        let dir = std::env::temp_dir().join(format!("xtask-setup-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut log = Log {
            path: dir.join("setup.log"),
        };
        log.step("a step that works", Command::new("echo").arg("fine"))
            .unwrap();
        let error = log
            .step(
                "a step that fails",
                Command::new("sh").args(["-c", "echo broken; exit 3"]),
            )
            .unwrap_err()
            .to_string();
        assert!(error.contains(&log.path.display().to_string()), "{error}");
        let text = fs::read_to_string(&log.path).unwrap();
        assert!(text.contains("fine") && text.contains("broken"), "{text}");
        fs::remove_dir_all(dir).unwrap();
    }
}
