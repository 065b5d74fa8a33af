//! The forwarding modes: how each one publishes the container's ports (and
//! N other mappings) in the host namespace, and how it takes them away.

use std::fmt::Write as _;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::ns::{self, H2C, H2E, Role, Topo, check, check_with_input, in_ns, in_ns_as};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    Direct,
    Iptables,
    Nft,
    DockerProxy,
    Portfwd,
}

pub(crate) const ALL_MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Iptables,
    Mode::Nft,
    Mode::DockerProxy,
    Mode::Portfwd,
];

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nft => "nft",
            Mode::DockerProxy => "docker-proxy",
            Mode::Portfwd => "portfwd",
        }
    }

    /// Modes measured with 1,000 and 10,000 other mappings (docker-proxy
    /// would need one process per mapping; direct has none).
    pub(crate) fn scales(self) -> bool {
        matches!(self, Mode::Iptables | Mode::Nft | Mode::Portfwd)
    }

    /// Whether the control plane's scale curve measures this mode.
    pub(crate) fn curves(self) -> bool {
        matches!(self, Mode::Nft | Mode::Portfwd)
    }
}

/// A container port and the host port that publishes it.
#[derive(Clone, Copy)]
pub(crate) struct Port {
    pub(crate) ctr: u16,
    pub(crate) host: u16,
    pub(crate) udp: bool,
}

pub(crate) const HTTP: Port = Port {
    ctr: 80,
    host: 8080,
    udp: false,
};
pub(crate) const IPERF: Port = Port {
    ctr: 5201,
    host: 8201,
    udp: false,
};
pub(crate) const ECHO: Port = Port {
    ctr: 5353,
    host: 8053,
    udp: true,
};
pub(crate) const PORTS: [Port; 3] = [HTTP, IPERF, ECHO];
/// The other mappings publish the container's ports OTHERS.. on the same host ports.
pub(crate) const OTHERS: u16 = 20000;
/// The port added and removed by the update timings.
pub(crate) const ONE: u16 = 40000;

/// What a mode needs to run: binaries and the pin directory.
pub(crate) struct Env<'a> {
    pub(crate) topo: &'a Topo,
    pub(crate) portfwd: PathBuf,
    pub(crate) bpffs: PathBuf,
    pub(crate) docker_proxy: Option<PathBuf>,
}

/// A mode set up in the host namespace; `teardown` undoes it.
pub(crate) struct Active {
    pub(crate) mode: Mode,
    proxies: Vec<Child>,
}

impl Env<'_> {
    fn ctr(&self) -> Ipv4Addr {
        self.topo.ctr_ip()
    }

    /// `portfwd ARGS` in the host namespace, with the bench's pin directory.
    pub(crate) fn portfwd(&self) -> Command {
        let mut cmd = in_ns(&self.topo.host, &self.portfwd);
        cmd.arg("--bpffs").arg(&self.bpffs);
        cmd
    }

    fn host_cmd(&self, program: &str) -> Command {
        in_ns(&self.topo.host, program)
    }

    pub(crate) fn setup(&self, mode: Mode, others: usize) -> Result<Active> {
        let mut active = Active {
            mode,
            proxies: Vec::new(),
        };
        let result = self.setup_into(&mut active, others);
        if let Err(e) = result {
            self.teardown(active);
            return Err(e);
        }
        Ok(active)
    }

    fn setup_into(&self, active: &mut Active, others: usize) -> Result<()> {
        match active.mode {
            Mode::Direct => {}
            Mode::Iptables => {
                self.route_localnet(true)?;
                check_with_input(
                    self.host_cmd("iptables-restore").args(["-w", "--noflush"]),
                    &self.iptables_rules(others),
                )?;
            }
            Mode::Nft => {
                self.route_localnet(true)?;
                check_with_input(
                    self.host_cmd("nft").args(["-f", "-"]),
                    &self.nft_rules(others),
                )?;
            }
            Mode::DockerProxy => {
                let bin = self
                    .docker_proxy
                    .as_ref()
                    .context("docker-proxy was not extracted")?;
                for port in PORTS {
                    let proxy = self.spawn_docker_proxy(bin, port)?;
                    active.proxies.push(proxy);
                }
            }
            Mode::Portfwd => {
                check(self.portfwd().args(["up", "--iface", H2E]))?;
                let mut map = self.portfwd();
                map.args(["map", "--name", "bench", &self.ctr().to_string()]);
                for p in PORTS {
                    map.arg(publish(p));
                }
                check(&mut map)?;
                if others > 0 {
                    self.portfwd_others(others)?;
                }
            }
        }
        Ok(())
    }

    /// `portfwd map` of `count` other mappings in one command; its duration.
    pub(crate) fn portfwd_others(&self, count: usize) -> Result<f64> {
        let last = OTHERS as usize + count - 1;
        // Port by port (`A-B:80` would be a pool: one mapping).
        let range = if count == 1 {
            format!("0.0.0.0:{OTHERS}:{OTHERS}")
        } else {
            format!("0.0.0.0:{OTHERS}-{last}:{OTHERS}-{last}")
        };
        let mut cmd = self.portfwd();
        cmd.args(["map", "--name", "others", &self.ctr().to_string(), &range]);
        timed(&mut cmd)
    }

    /// How many mappings (rules, map elements) the mode has installed.
    pub(crate) fn count(&self, mode: Mode) -> Result<usize> {
        Ok(match mode {
            Mode::Iptables => check(self.host_cmd("iptables").args([
                "-w",
                "-t",
                "nat",
                "-S",
                "CNI-HOSTPORT-DNAT",
            ]))?
            .lines()
            .filter(|l| l.contains("DNAT --to-destination"))
            .count(),
            Mode::Nft => {
                let out = check(self.host_cmd("nft").args([
                    "-j",
                    "list",
                    "map",
                    "ip",
                    "pfbench",
                    "hostports",
                ]))?;
                let json: serde_json::Value = serde_json::from_str(&out)?;
                json["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["map"]["elem"].as_array())
                    .map(Vec::len)
                    .sum()
            }
            Mode::Portfwd => {
                let out = check(self.portfwd().args(["list", "--json"]))?;
                let json: serde_json::Value = serde_json::from_str(&out)?;
                json["mappings"].as_array().map_or(0, Vec::len)
            }
            Mode::Direct | Mode::DockerProxy => 0,
        })
    }

    pub(crate) fn teardown(&self, mut active: Active) {
        for proxy in &mut active.proxies {
            proxy.kill().ok();
            proxy.wait().ok();
        }
        match active.mode {
            Mode::Iptables | Mode::Nft => {
                // Removes iptables-nft's tables too: no NAT hook (and so no
                // conntrack) is left for the next mode.
                check(self.host_cmd("nft").args(["flush", "ruleset"])).ok();
                self.route_localnet(false).ok();
            }
            Mode::Portfwd => {
                check(self.portfwd().arg("down")).ok();
            }
            Mode::Direct | Mode::DockerProxy => {}
        }
    }

    /// Docker's localhost hairpin with the userland proxy off: 127.0.0.1 may
    /// be routed out of the bridge interface, and is masqueraded there.
    fn route_localnet(&self, on: bool) -> Result<()> {
        let key = format!("net.ipv4.conf.{H2C}.route_localnet");
        ns::sysctl(&self.topo.host, &key, if on { "1" } else { "0" })
    }

    /// The CNI portmap plugin's rules (PREROUTING/OUTPUT --dst-type LOCAL to
    /// CNI-HOSTPORT-DNAT, then a per-container chain), plus Docker's
    /// masquerade of local sources towards the container. The other mappings
    /// are one DNAT rule each, walked before the measured container's rules,
    /// so that every new connection walks them all.
    pub(crate) fn iptables_rules(&self, others: usize) -> String {
        let ctr = self.ctr();
        let mut s = String::from("*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n:CNI-DN-bench - [0:0]\n");
        s += "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n";
        s += "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n";
        writeln!(
            s,
            "-A POSTROUTING -m addrtype --src-type LOCAL -o {H2C} -j MASQUERADE"
        )
        .expect("writing to a String");
        s += &iptables_others(ctr, 0, others);
        let tcp: Vec<String> = PORTS
            .iter()
            .filter(|p| !p.udp)
            .map(|p| p.host.to_string())
            .collect();
        writeln!(
            s,
            "-A CNI-HOSTPORT-DNAT -p tcp -m multiport --dports {} -j CNI-DN-bench",
            tcp.join(",")
        )
        .expect("writing to a String");
        for p in PORTS.iter().filter(|p| p.udp) {
            writeln!(
                s,
                "-A CNI-HOSTPORT-DNAT -p udp --dport {} -j CNI-DN-bench",
                p.host
            )
            .expect("writing to a String");
        }
        for p in PORTS {
            let proto = if p.udp { "udp" } else { "tcp" };
            writeln!(
                s,
                "-A CNI-DN-bench -p {proto} --dport {} -j DNAT --to-destination {ctr}:{}",
                p.host, p.ctr
            )
            .expect("writing to a String");
        }
        s += "COMMIT\n";
        s
    }

    /// A kube-proxy-style nftables NAT: one map lookup per new connection.
    pub(crate) fn nft_rules(&self, others: usize) -> String {
        let ctr = self.ctr();
        let mut elements: Vec<String> = PORTS
            .iter()
            .map(|p| {
                let proto = if p.udp { "udp" } else { "tcp" };
                format!("{proto} . {} : {ctr} . {}", p.host, p.ctr)
            })
            .collect();
        elements.extend(nft_others(ctr, 0, others));
        format!(
            "table ip pfbench {{
  map hostports {{
    type inet_proto . inet_service : ipv4_addr . inet_service
    elements = {{ {} }}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @hostports
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    fib daddr type local dnat ip to meta l4proto . th dport map @hostports
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 127.0.0.0/8 oifname \"{H2C}\" masquerade
  }}
}}
",
            elements.join(",\n      ")
        )
    }

    /// One docker-proxy process for one port, as dockerd runs it; returns
    /// once it reported (on fd 3) that it listens.
    fn spawn_docker_proxy(&self, bin: &Path, port: Port) -> Result<Child> {
        let (mut ready, signal) = std::io::pipe()?;
        let signal_fd = signal.as_raw_fd();
        let mut cmd = in_ns_as(&self.topo.host, bin, Role::Proxy);
        cmd.args(["-proto", if port.udp { "udp" } else { "tcp" }])
            .args(["-host-ip", "0.0.0.0", "-host-port", &port.host.to_string()])
            .args(["-container-ip", &self.ctr().to_string()])
            .args(["-container-port", &port.ctr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0);
        // SAFETY: dup2 and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let ok = if signal_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(signal_fd, 3) == 3
                };
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn().context("starting docker-proxy")?;
        drop(cmd);
        drop(signal);
        // "0\n" once it listens, "1\n<error>" if it cannot; EOF if it died.
        let mut answer = Vec::new();
        let mut byte = [0u8];
        while let Ok(1) = ready.read(&mut byte) {
            if byte[0] == b'\n' {
                break;
            }
            answer.push(byte[0]);
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        if answer.trim() != "0" {
            child.kill().ok();
            child.wait().ok();
            bail!(
                "docker-proxy for port {} did not start: {:?}",
                port.host,
                answer.trim()
            );
        }
        Ok(child)
    }
}

/// `0.0.0.0:HOST:CTR[/udp]`: IPv4 only, so one entry per port.
pub(crate) fn publish(p: Port) -> String {
    let suffix = if p.udp { "/udp" } else { "" };
    format!("0.0.0.0:{}:{}{suffix}", p.host, p.ctr)
}

/// iptables-restore lines for other mappings `first..first+count`.
pub(crate) fn iptables_others(ctr: Ipv4Addr, first: usize, count: usize) -> String {
    let mut s = String::new();
    for i in first..first + count {
        let port = OTHERS as usize + i;
        writeln!(
            s,
            "-A CNI-HOSTPORT-DNAT -p tcp --dport {port} -j DNAT --to-destination {ctr}:{port}"
        )
        .expect("writing to a String");
    }
    s
}

/// nft map elements for other mappings `first..first+count`.
pub(crate) fn nft_others(ctr: Ipv4Addr, first: usize, count: usize) -> Vec<String> {
    (first..first + count)
        .map(|i| {
            let port = OTHERS as usize + i;
            format!("tcp . {port} : {ctr} . {port}")
        })
        .collect()
}

/// Runs a command to completion (quietly) and returns its wall time in ms:
/// process start, work and exit, as a user or a runtime sees it.
pub(crate) fn timed(cmd: &mut Command) -> Result<f64> {
    cmd.stdin(Stdio::null());
    time_to_exit(cmd)
}

/// Like `timed`, with stdin from the file `input` (`cmd < file`).
pub(crate) fn timed_with_input(cmd: &mut Command, input: &Path) -> Result<f64> {
    cmd.stdin(std::fs::File::open(input)?);
    time_to_exit(cmd)
}

fn time_to_exit(cmd: &mut Command) -> Result<f64> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", crate::display(cmd)))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    ns::succeeded(cmd, &out)?;
    Ok(ms)
}
