//! The benchmark's topology: three network namespaces, none of them the
//! machine's own, and commands run inside them.
//!
//! ```text
//! <p>-cli (10.N.2.2) --veth-- (10.N.2.1) h2e  <p>-host  h2c (10.N.1.1) --veth-- (10.N.1.2) <p>-ctr
//!  external client                 the "container host"                         the servers
//! ```
//!
//! Every rule, sysctl, proxy process and local-path client lives in `<p>-host`,
//! so the machine's own network namespace is never touched.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{display, run, stdout_of};

/// Host-side interface towards the container (in the host namespace).
pub(crate) const H2C: &str = "h2c";
/// Host-side interface towards the external client: the uplink.
pub(crate) const H2E: &str = "h2e";

pub(crate) struct Topo {
    pub(crate) host: String,
    pub(crate) ctr: String,
    pub(crate) cli: String,
    /// The second octet of the 10.N.0.0/16 the topology uses.
    pub(crate) net: u8,
}

impl Topo {
    /// Names the namespaces `<prefix>-host`, `-ctr`, `-cli` and picks a 10.N/16
    /// that no address or route of the machine uses.
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let used = format!(
            "{}{}",
            stdout_of(Command::new("ip").args(["-4", "addr", "show"]))?,
            stdout_of(Command::new("ip").args(["-4", "route", "show", "table", "all"]))?
        );
        let net = (240..=250u8)
            .rev()
            .find(|n| !used.contains(&format!("10.{n}.")))
            .context("every candidate subnet 10.240-250.0.0/16 is in use on this machine")?;
        Ok(Topo {
            host: format!("{prefix}-host"),
            ctr: format!("{prefix}-ctr"),
            cli: format!("{prefix}-cli"),
            net,
        })
    }

    pub(crate) fn ctr_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 1, 2)
    }

    /// The host's address on the uplink: what external clients dial.
    pub(crate) fn uplink_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net, 2, 1)
    }

    pub(crate) fn create(&self) -> Result<()> {
        let n = self.net;
        for ns in [&self.host, &self.ctr, &self.cli] {
            run(Command::new("ip").args(["netns", "add", ns]))?;
            ip(ns, "link set lo up")?;
        }
        // Each veth is created with its ends directly in their namespaces.
        for (host_if, peer_ns) in [(H2C, &self.ctr), (H2E, &self.cli)] {
            run(Command::new("ip").args([
                "link", "add", host_if, "netns", &self.host, "type", "veth", "peer", "name",
                "eth0", "netns", peer_ns,
            ]))?;
        }
        ip(&self.host, &format!("addr add 10.{n}.1.1/24 dev {H2C}"))?;
        ip(&self.host, &format!("addr add 10.{n}.2.1/24 dev {H2E}"))?;
        ip(&self.host, &format!("link set {H2C} up"))?;
        ip(&self.host, &format!("link set {H2E} up"))?;
        ip(&self.ctr, &format!("addr add 10.{n}.1.2/24 dev eth0"))?;
        ip(&self.ctr, "link set eth0 up")?;
        ip(&self.ctr, &format!("route add default via 10.{n}.1.1"))?;
        ip(&self.cli, &format!("addr add 10.{n}.2.2/24 dev eth0"))?;
        ip(&self.cli, "link set eth0 up")?;
        ip(&self.cli, &format!("route add default via 10.{n}.2.1"))?;

        // The host routes between client and container (as a container host
        // does; `direct` needs it, portfwd does not).
        sysctl(&self.host, "net.ipv4.ip_forward", "1")?;
        // A SYN that reuses a port in the server's TIME_WAIT is rejected about
        // half the time (per-connection timestamp offsets) and retried after
        // 10 ms-1 s: keep no TIME_WAIT sockets on the serving side. The host
        // namespace serves too, in docker-proxy mode.
        sysctl(&self.ctr, "net.ipv4.tcp_max_tw_buckets", "0")?;
        sysctl(&self.host, "net.ipv4.tcp_max_tw_buckets", "0")?;
        Ok(())
    }

    /// Kills whatever still runs in the namespaces (by process id) and deletes
    /// them, which removes the veths, rules and conntrack entries with them.
    pub(crate) fn destroy(&self) {
        for ns in [&self.host, &self.ctr, &self.cli] {
            if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
                continue;
            }
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status()
                .ok();
        }
    }
}

/// `ip -n NS <line>`.
pub(crate) fn ip(ns: &str, line: &str) -> Result<()> {
    run(Command::new("ip")
        .args(["-n", ns])
        .args(line.split_whitespace()))
}

/// Writes a sysctl inside a namespace (net.* sysctls are per namespace).
pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    let out = in_ns(ns, "sysctl")
        .args(["-qw", &format!("{key}={value}")])
        .output()
        .with_context(|| format!("running sysctl in {ns}"))?;
    if !out.status.success() {
        bail!(
            "sysctl -w {key}={value} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The nice value of every process the bench starts in its namespaces.
pub(crate) static NICE: AtomicI32 = AtomicI32::new(0);

/// A command that runs in network namespace `ns`: the child enters it with
/// setns() before exec, so only its network namespace changes (unlike
/// `ip netns exec`, which remounts /sys and so hides /sys/fs/bpf). No extra
/// process (nsenter) sits in the timings. It runs at nice `NICE`.
pub(crate) fn in_ns(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let file = File::open(format!("/run/netns/{ns}"));
    let nice = NICE.load(Ordering::Relaxed);
    // SAFETY: the closure only calls setns and setpriority, which are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || match &file {
            Ok(f) => {
                if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            Err(e) => Err(std::io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(libc::ENOENT),
            )),
        });
    }
    cmd
}

/// Runs a command quietly and fails with its stderr unless it exits 0.
pub(crate) fn check(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    succeeded(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails, with the command's stderr, unless it exited 0.
pub(crate) fn succeeded(cmd: &Command, out: &std::process::Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command with stdin from `input`, quietly; fails unless it exits 0.
pub(crate) fn check_with_input(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    succeeded(cmd, &out)?;
    Ok(())
}

/// Waits until something listens on `port` (`proto` "t" or "u") in `ns`.
pub(crate) fn wait_listening(ns: &str, proto: &str, port: u16) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let out = in_ns(ns, "ss")
            .args([&format!("-Hln{proto}"), &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {port} in {ns} after 10 s")
}

/// A counter of /proc/net/netstat (e.g. TcpExt TCPSynRetrans) in `ns`.
pub(crate) fn netstat(ns: &str, group: &str, name: &str) -> Result<u64> {
    let text = check(in_ns(ns, "cat").arg("/proc/net/netstat"))?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no {group} counters in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no counter {group} {name}"))
}
