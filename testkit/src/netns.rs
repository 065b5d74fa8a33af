//! Network namespaces (`ip netns`), veth pairs, and running things inside a
//! namespace.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Where `ip netns add NAME` puts the namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn check(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` in the host namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    check(Command::new("ip").args(args))
}

/// `ip -n NAME ARGS`.
pub fn ip_in(name: &str, args: &[&str]) -> Result<String> {
    check(Command::new("ip").args(["-n", name]).args(args))
}

/// Creates namespace `name` with its loopback up, after deleting a
/// leftover of an interrupted run.
pub fn add(name: &str) -> Result<()> {
    delete(name);
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills whatever still runs in namespace `name` and deletes it (which
/// removes its links, the ends of veth pairs with them); nothing if it
/// does not exist.
pub fn delete(name: &str) {
    if !path(name).exists() {
        return;
    }
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
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
    // Best effort: a namespace that cannot go is reported by the next `add`.
    Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status()
        .ok();
}

/// A veth pair: `a_if` in namespace `a_ns` (None: the host), `b_if` in
/// `b_ns`; both down, without IP addresses. A leftover `a_if` of an
/// interrupted run (in the host) is deleted first.
///
/// Each end's MAC is set from its namespace and name, not left random: where udevd runs
/// (virtme-ng's guests do), `MACAddressPolicy=persistent` replaces a
/// random MAC some time after the link is made, and a test that read the
/// MAC before that sends frames the kernel no longer takes as the host's
/// (PACKET_OTHERHOST), which the TC programs leave alone.
pub fn veth(a_if: &str, a_ns: Option<&str>, b_if: &str, b_ns: &str) -> Result<()> {
    if a_ns.is_none() {
        Command::new("ip")
            .args(["link", "del", a_if])
            .stderr(Stdio::null())
            .status()
            .ok();
    }
    let a_place = format!("{}/{a_if}", a_ns.unwrap_or(""));
    let (a_mac, b_mac) = (mac_of(&a_place), mac_of(&format!("{b_ns}/{b_if}")));
    let mut args = vec!["link", "add", a_if, "address", &a_mac];
    if let Some(ns) = a_ns {
        args.extend(["netns", ns]);
    }
    args.extend(["type", "veth", "peer", "name", b_if, "address", &b_mac]);
    args.extend(["netns", b_ns]);
    ip(&args)?;
    // No duplicate address detection on either end: until it ends (1-2 s
    // after the link comes up) the link-local address is tentative, and
    // the kernel sends no neighbour solicitation from a link without a
    // ready one, so a test's first IPv6 packets through a fresh pair would
    // wait that long for their neighbour. The pair is the test's own.
    for (ns, ifname) in [(a_ns, a_if), (Some(b_ns), b_if)] {
        let key = format!("net.ipv6.conf.{ifname}.accept_dad");
        match ns {
            Some(ns) => sysctl(ns, &key, "0")?,
            None => std::fs::write(format!("/proc/sys/{}", key.replace('.', "/")), "0")
                .with_context(|| format!("{key}=0"))?,
        }
    }
    Ok(())
}

/// A locally administered unicast MAC derived from `place`, an interface's
/// namespace and name (FNV-1a): the two ends of a pair differ, so do
/// same-named interfaces of different namespaces, and a test's links keep
/// theirs from one run to the next.
fn mac_of(place: &str) -> String {
    let hash = place.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let [_, _, _, a, b, c, d, e] = hash.to_be_bytes();
    format!("02:{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}")
}

/// Enters the network namespace at `path` (this thread only).
pub fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a file we own, for this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside the namespace at `path`.
pub fn inside<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    thread::spawn(move || {
        enter(&path).unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
        f()
    })
    .join()
    .expect("the thread inside the namespace panicked")
}

/// A command that runs in namespace `name`: the child enters it with
/// setns() before exec, so only its network namespace changes (unlike
/// `ip netns exec`, which remounts /sys and so hides /sys/fs/bpf), and no
/// extra process sits in between.
pub fn command(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let file = File::open(path(name));
    // SAFETY: the closure only calls setns, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || match &file {
            Ok(f) if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) == 0 => Ok(()),
            Ok(_) => Err(io::Error::last_os_error()),
            Err(e) => Err(io::Error::from_raw_os_error(
                e.raw_os_error().unwrap_or(libc::ENOENT),
            )),
        });
    }
    cmd
}

/// Writes a sysctl inside namespace `name` (net.* sysctls are per
/// namespace).
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    check(command(name, "sysctl").args(["-qw", &format!("{key}={value}")]))
        .with_context(|| format!("sysctl -w {key}={value} in {name}"))?;
    Ok(())
}

/// Waits (at most 10 s) until something listens on `port` in namespace
/// `name`; `proto` is `t` or `u`.
pub fn wait_listening(name: &str, proto: &str, port: u16) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let out = command(name, "ss")
            .args([&format!("-Hln{proto}"), &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {port} in {name} after 10 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_unicast_local_and_distinct() {
        let (a, b, c) = (
            mac_of("/pft43h"),
            mac_of("pft-ctr43/pft43c"),
            mac_of("x/eth0"),
        );
        assert!(a.starts_with("02:") && a.len() == 17, "{a}");
        assert_ne!(a, b);
        assert_ne!(c, mac_of("y/eth0"));
        assert_eq!(a, mac_of("/pft43h"));
    }

    /// Right after `link set up`, neither end's link-local address is
    /// tentative: the kernel solicits a neighbour only from a ready
    /// link-local address, so a test's first IPv6 packets through a fresh
    /// pair would otherwise wait until DAD ends (1-2 s) and a 2 s timeout
    /// could expire (seen in CI: pmtu's first datagram). Needs root.
    #[test]
    fn fresh_pairs_solicit_neighbours_at_once() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        const NS: &str = "pfk-dad";
        add(NS).unwrap();
        let result = (|| -> Result<()> {
            veth("pfkdadh", None, "pfkdadc", NS)?;
            ip(&["link", "set", "pfkdadh", "up"])?;
            ip_in(NS, &["link", "set", "pfkdadc", "up"])?;
            let tentative = [
                ip(&["-6", "addr", "show", "dev", "pfkdadh", "tentative"])?,
                ip_in(NS, &["-6", "addr", "show", "dev", "pfkdadc", "tentative"])?,
            ];
            if tentative.iter().any(|out| !out.trim().is_empty()) {
                bail!("tentative link-local addresses: {tentative:?}");
            }
            Ok(())
        })();
        delete(NS);
        Command::new("ip")
            .args(["link", "del", "pfkdadh"])
            .stderr(Stdio::null())
            .status()
            .ok();
        result.unwrap();
    }
}
