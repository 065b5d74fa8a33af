//! The benchmark's topology: three network namespaces, none of them the
//! machine's own, and commands run inside them (on `portfwd_testkit`, which
//! the integration tests use too).
//!
//! ```text
//! <p>-cli (10.N.2.2) --veth-- (10.N.2.1) h2e  <p>-host  h2c (10.N.1.1) --veth-- (10.N.1.2) <p>-ctr
//!  external client                 the "container host"                         the servers
//! ```
//!
//! Every rule, sysctl, proxy process and local-path client lives in `<p>-host`,
//! so the machine's own network namespace is never touched.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use portfwd_testkit::netns;

use crate::{display, stdout_of};

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
            netns::add(ns)?;
        }
        // Each veth is created with its ends directly in their namespaces.
        netns::veth(H2C, Some(&self.host), "eth0", &self.ctr)?;
        netns::veth(H2E, Some(&self.host), "eth0", &self.cli)?;
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
            netns::delete(ns);
        }
    }
}

/// `ip -n NS <line>`.
pub(crate) fn ip(ns: &str, line: &str) -> Result<()> {
    let args: Vec<&str> = line.split_whitespace().collect();
    netns::ip_in(ns, &args)?;
    Ok(())
}

/// Writes a sysctl inside a namespace (net.* sysctls are per namespace).
pub(crate) fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    netns::sysctl(ns, key, value)
}

/// The nice value of every process the bench starts in its namespaces.
pub(crate) static NICE: AtomicI32 = AtomicI32::new(0);

/// Whether the bench's processes run on fixed CPUs by role (`--pin`).
pub(crate) static PIN: AtomicBool = AtomicBool::new(false);

/// What a process of the bench does, which decides its CPU under `--pin`:
/// clients on one CPU, servers and the proxies that stand in front of them
/// on another, so that one single-stream run does not land its client and
/// server on the same CPU in one repetition and on two in the next (the
/// bimodal throughput of unpinned runs). The kernel's forwarding work, the
/// TC programs included, runs in softirq on the CPU of the sending side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
    /// docker-proxy: a process of its own, beside the server.
    Proxy,
    /// The CLIs of the control-plane figures: never pinned.
    Control,
}

impl Role {
    /// The CPU of this role under `--pin`, on a machine with `cpus` CPUs.
    fn cpu(self, cpus: usize) -> Option<usize> {
        match self {
            _ if cpus < 2 => None,
            Role::Client => Some(0),
            Role::Server | Role::Proxy => Some(1),
            Role::Control => None,
        }
    }
}

/// A command that runs in network namespace `ns` (see
/// `portfwd_testkit::netns::command`), at nice `NICE`: no extra process
/// (nsenter) sits in the timings.
pub(crate) fn in_ns(ns: &str, program: impl AsRef<OsStr>) -> Command {
    in_ns_as(ns, program, Role::Control)
}

/// `in_ns` for a process of `role`: on its CPU under `--pin`.
pub(crate) fn in_ns_as(ns: &str, program: impl AsRef<OsStr>, role: Role) -> Command {
    let mut cmd = netns::command(ns, program);
    let nice = NICE.load(Ordering::Relaxed);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = PIN
        .load(Ordering::Relaxed)
        .then(|| role.cpu(cpus))
        .flatten();
    if nice != 0 || cpu.is_some() {
        // SAFETY: the closure only calls setpriority and sched_setaffinity,
        // which are async-signal-safe, on a cpu_set_t of its own stack.
        unsafe {
            cmd.pre_exec(move || {
                if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cpu) = cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
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
    netns::wait_listening(ns, proto, port)
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
