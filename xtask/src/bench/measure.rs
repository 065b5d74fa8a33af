//! The load generators (iperf3, wrk, our UDP request/response client) and
//! the parsing of what they report.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::modes::{ECHO, HTTP, IPERF, Mode, Port};
use super::ns::{Role, Topo, check, in_ns_as, netstat};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum NetPath {
    External,
    Local,
}

impl NetPath {
    pub(crate) fn name(self) -> &'static str {
        match self {
            NetPath::External => "external",
            NetPath::Local => "local",
        }
    }
}

pub(crate) const PATHS: [NetPath; 2] = [NetPath::External, NetPath::Local];

/// The loads a trial puts on a path, each measured by its own tool run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Traffic {
    /// iperf3: `Metric::TcpGbps`.
    Tcp,
    /// wrk on kept-alive connections: `Metric::KaRps` and its latencies.
    KeepAlive,
    /// wrk, a connection per request: `Metric::ConnPerS` and its latencies.
    NewConnections,
    /// `Metric::UdpRps`.
    Udp,
    /// `Metric::Udp4kRps`.
    Udp4k,
}

pub(crate) const TRAFFIC: [Traffic; 5] = [
    Traffic::Tcp,
    Traffic::KeepAlive,
    Traffic::NewConnections,
    Traffic::Udp,
    Traffic::Udp4k,
];

impl Traffic {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Traffic::Tcp => "tcp",
            Traffic::KeepAlive => "keep-alive",
            Traffic::NewConnections => "new-connections",
            Traffic::Udp => "udp",
            Traffic::Udp4k => "udp-4k",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Metric {
    /// Single-stream TCP throughput (iperf3), Gbit/s.
    TcpGbps,
    /// Keep-alive HTTP requests per second (wrk).
    KaRps,
    KaP50Ms,
    KaP99Ms,
    /// New connections per second: one request per connection.
    ConnPerS,
    ConnP50Ms,
    ConnP99Ms,
    /// Sequential UDP request/response per second, one socket.
    UdpRps,
    /// The same with 4,000-byte requests and replies: three IP fragments
    /// each way on a 1500-byte link (what EDNS0 DNS answers look like).
    Udp4kRps,
}

/// The request (and reply) size of `Metric::Udp4kRps`.
pub(crate) const UDP_LARGE: usize = 4_000;

pub(crate) const METRICS: [Metric; 9] = [
    Metric::TcpGbps,
    Metric::KaRps,
    Metric::KaP50Ms,
    Metric::KaP99Ms,
    Metric::ConnPerS,
    Metric::ConnP50Ms,
    Metric::ConnP99Ms,
    Metric::UdpRps,
    Metric::Udp4kRps,
];

impl Metric {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Metric::TcpGbps => "TCP Gbit/s",
            Metric::KaRps => "keep-alive req/s",
            Metric::KaP50Ms => "keep-alive p50 ms",
            Metric::KaP99Ms => "keep-alive p99 ms",
            Metric::ConnPerS => "new conn/s",
            Metric::ConnP50Ms => "new-conn p50 ms",
            Metric::ConnP99Ms => "new-conn p99 ms",
            Metric::UdpRps => "UDP req/s",
            Metric::Udp4kRps => "UDP 4 KB req/s",
        }
    }

    pub(crate) fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::TcpGbps | Metric::KaRps | Metric::ConnPerS | Metric::UdpRps | Metric::Udp4kRps
        )
    }
}

/// Where a client runs and what it dials, for a mode and a path.
pub(crate) struct Target {
    pub(crate) ns: String,
    pub(crate) addr: Ipv4Addr,
    direct: bool,
    /// Dial this port for HTTP instead (a mapping added on the fly).
    pub(crate) port_override: Option<u16>,
}

impl Target {
    pub(crate) fn new(topo: &Topo, mode: Mode, path: NetPath) -> Self {
        let direct = mode == Mode::Direct;
        let (ns, addr) = match (path, direct) {
            (_, true) => (path_ns(topo, path), topo.ctr_ip()),
            (NetPath::External, false) => (topo.cli.clone(), topo.uplink_ip()),
            (NetPath::Local, false) => (topo.host.clone(), Ipv4Addr::LOCALHOST),
        };
        Target {
            ns,
            addr,
            direct,
            port_override: None,
        }
    }

    fn port(&self, p: Port) -> u16 {
        if self.direct { p.ctr } else { p.host }
    }

    fn url(&self) -> String {
        let port = self.port_override.unwrap_or(self.port(HTTP));
        format!("http://{}:{port}/", self.addr)
    }
}

fn path_ns(topo: &Topo, path: NetPath) -> String {
    match path {
        NetPath::External => topo.cli.clone(),
        NetPath::Local => topo.host.clone(),
    }
}

/// Load settings.
pub(crate) struct Load {
    pub(crate) secs: u64,
    pub(crate) connections: u32,
}

/// One HTTP request, to check that the path forwards before measuring it.
pub(crate) fn probe(target: &Target) -> Result<()> {
    let body = check(
        in_ns_as(&target.ns, "curl", Role::Client)
            .args(["-sS", "--max-time", "3", &target.url()])
            .stderr(std::process::Stdio::piped()),
    )
    .with_context(|| format!("{} does not answer through this mode", target.url()))?;
    if !body.starts_with("ok") {
        bail!("{} answered {body:?}", target.url());
    }
    Ok(())
}

pub(crate) fn iperf3(target: &Target, load: &Load) -> Result<f64> {
    let out = check(
        in_ns_as(&target.ns, "timeout", Role::Client)
            .args(["-k", "2", &(load.secs + 15).to_string(), "iperf3", "-J"])
            .args(["-c", &target.addr.to_string()])
            .args(["-p", &target.port(IPERF).to_string()])
            .args(["-t", &load.secs.to_string()]),
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(e) = json.get("error") {
        bail!("iperf3: {e}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no received throughput")?;
    Ok(bps / 1e9)
}

/// What one wrk run measured.
#[derive(Debug)]
pub(crate) struct Wrk {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
    pub(crate) syn_retrans: u64,
}

/// wrk for SECS with CONNECTIONS connections (one thread); with `close`,
/// every request is on a new connection (`Connection: close`).
pub(crate) fn wrk(target: &Target, load: &Load, close: bool) -> Result<Wrk> {
    let before = netstat(&target.ns, "TcpExt", "TCPSynRetrans")?;
    let mut cmd = in_ns_as(&target.ns, "timeout", Role::Client);
    cmd.args(["-k", "2", &(load.secs + 15).to_string(), "wrk", "-t1"])
        .args(["-c", &load.connections.to_string()])
        .args([
            "-d",
            &format!("{}s", load.secs),
            "--latency",
            "--timeout",
            "2s",
        ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = check(cmd.arg(target.url()))?;
    let after = netstat(&target.ns, "TcpExt", "TCPSynRetrans")?;
    let mut result = parse_wrk(&out)?;
    result.syn_retrans = after.saturating_sub(before);
    Ok(result)
}

pub(crate) fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0;
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50%", v] => p50 = parse_duration_ms(v),
            ["99%", v] => p99 = parse_duration_ms(v),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    let (Some(rps), Some(p50_ms), Some(p99_ms)) = (rps, p50, p99) else {
        bail!("cannot read wrk's output:\n{out}");
    };
    if rps == 0.0 {
        bail!("wrk completed no request:\n{out}");
    }
    Ok(Wrk {
        rps,
        p50_ms,
        p99_ms,
        errors,
        syn_retrans: 0,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`, `1.50m`.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(value * scale)
}

/// Our UDP request/response client, requests of `size` bytes; requests per
/// second.
pub(crate) fn udp_rr(xtask: &Path, target: &Target, load: &Load, size: usize) -> Result<f64> {
    let addr = format!("{}:{}", target.addr, target.port(ECHO));
    let out = check(
        in_ns_as(&target.ns, "timeout", Role::Client)
            .args(["-k", "2", &(load.secs + 15).to_string()])
            .arg(xtask)
            .args([
                "bench-tool",
                "udp-rr",
                &addr,
                "--secs",
                &load.secs.to_string(),
                "--size",
                &size.to_string(),
            ]),
    )?;
    let json: serde_json::Value = serde_json::from_str(out.trim()).context("udp-rr output")?;
    json["rate"].as_f64().context("udp-rr reported no rate")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 1s test @ http://10.250.1.2:80/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   420.91us  209.13us   4.90ms   87.94%
    Req/Sec    37.88k     1.60k   39.71k    80.00%
  Latency Distribution
     50%  370.00us
     75%  456.00us
     90%  624.00us
     99%    1.28ms
  37696 requests in 1.00s, 5.53MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  37653.61
Transfer/sec:      5.53MB
";

    #[test]
    fn reads_wrk_output() {
        let w = parse_wrk(WRK).unwrap();
        assert_eq!(w.rps, 37653.61);
        assert!((w.p50_ms - 0.37).abs() < 1e-9);
        assert!((w.p99_ms - 1.28).abs() < 1e-9);
        assert_eq!(w.errors, 4);
    }

    #[test]
    fn reads_wrk_durations() {
        assert_eq!(parse_duration_ms("2.00s"), Some(2000.0));
        assert_eq!(parse_duration_ms("1.50m"), Some(90000.0));
        assert_eq!(parse_duration_ms("12"), None);
    }
}
