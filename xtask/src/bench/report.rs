//! The results as Markdown tables (printed, and written for the docs), as
//! JSON, and checked against the issue's targets.

use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;
use serde_json::{Value, json};

use super::measure::{Metric, NetPath, PATHS};
use super::modes::Mode;
use super::targets::{Check, issue_11, targets};
use super::{CURVE, Plan, Results, SCALE, Update};

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProgCost {
    pub(crate) path: NetPath,
    pub(crate) program: String,
    pub(crate) calls_per_conn: f64,
    pub(crate) ns_per_call: f64,
}

#[derive(Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cpus: usize,
    pub(crate) memory: String,
    pub(crate) kernel: String,
    pub(crate) tools: Vec<(String, String)>,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub(super) fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

pub(crate) fn machine(docker_proxy: Option<String>) -> Machine {
    let lscpu = first_line(Command::new("sh").args(["-c", "lscpu | grep '^Model name'"]));
    let cpu = lscpu
        .split_once(':')
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or(lscpu);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let mut tools = vec![
        (
            "iptables".into(),
            first_line(Command::new("iptables").arg("-V")),
        ),
        ("nft".into(), first_line(Command::new("nft").arg("-v"))),
        ("wrk".into(), first_line(Command::new("wrk").arg("-v"))),
        (
            "iperf3".into(),
            first_line(Command::new("iperf3").arg("--version")),
        ),
        ("nginx".into(), first_line(Command::new("nginx").arg("-v"))),
    ];
    if let Some(v) = docker_proxy {
        tools.push(("docker-proxy".into(), format!("Debian docker.io {v}")));
    }
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory: format!("{:.0} GiB", kib / 1024.0 / 1024.0),
        kernel: first_line(Command::new("uname").arg("-r")),
        tools,
    }
}

/// Other mappings in a mode's main (non-scale) trials.
pub(crate) fn base_others(mode: Mode) -> usize {
    usize::from(mode.scales())
}

fn others_label(mode: Mode, others: usize) -> String {
    match mode {
        Mode::Direct => "none (no NAT)".into(),
        Mode::DockerProxy => "1 (a process per mapping)".into(),
        _ => format!(
            "{} + {others} other{}",
            1,
            if others == 1 { "" } else { "s" }
        ),
    }
}

pub(super) fn value(metric: Metric, v: f64) -> String {
    match metric {
        Metric::TcpGbps => format!("{v:.1}"),
        Metric::KaP50Ms | Metric::KaP99Ms | Metric::ConnP50Ms | Metric::ConnP99Ms => {
            if v < 1.0 {
                format!("{v:.3}")
            } else {
                format!("{v:.2}")
            }
        }
        _ => format!("{v:.0}"),
    }
}

/// `median (min–max)`, or just the median for one sample.
fn cell(metric: Metric, samples: &[f64]) -> String {
    let med = median(samples);
    if samples.len() < 2 {
        return value(metric, med);
    }
    let (min, max) = min_max(samples);
    format!(
        "{} ({}–{})",
        value(metric, med),
        value(metric, min),
        value(metric, max)
    )
}

pub(super) fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "–".into()
    }
}

impl Results {
    pub(crate) fn series(
        &self,
        mode: Mode,
        path: NetPath,
        others: usize,
        metric: Metric,
    ) -> &[f64] {
        self.samples
            .get(&(mode, path, others, metric))
            .map_or(&[], |v| v.as_slice())
    }

    pub(crate) fn med(
        &self,
        mode: Mode,
        path: NetPath,
        others: usize,
        metric: Metric,
    ) -> Option<f64> {
        let s = self.series(mode, path, others, metric);
        (!s.is_empty()).then(|| median(s))
    }

    /// A mode's main-trial median.
    pub(crate) fn main(&self, mode: Mode, path: NetPath, metric: Metric) -> Option<f64> {
        self.med(mode, path, base_others(mode), metric)
    }

    /// mode / direct, medians of the main trials.
    pub(crate) fn vs_direct(&self, mode: Mode, path: NetPath, metric: Metric) -> Option<f64> {
        Some(self.main(mode, path, metric)? / self.main(Mode::Direct, path, metric)?)
    }

    /// portfwd / `other` repetition by repetition (main trials): each
    /// repetition's portfwd figure against the same repetition's figure of
    /// `other`, measured minutes apart at most, where the medians may come
    /// from repetitions far apart in time. None unless both have every
    /// repetition.
    pub(crate) fn per_repetition(
        &self,
        other: Mode,
        path: NetPath,
        metric: Metric,
    ) -> Option<Vec<f64>> {
        let ours = self.series(Mode::Portfwd, path, base_others(Mode::Portfwd), metric);
        let theirs = self.series(other, path, base_others(other), metric);
        (!ours.is_empty() && ours.len() == theirs.len())
            .then(|| ours.iter().zip(theirs).map(|(a, b)| a / b).collect())
    }
}

/// A table of portfwd against each other mode of the run, a row per path
/// and mode, a column per main metric; `cell` gives each cell's text.
fn versus_table(s: &mut String, plan: &Plan, cell: impl Fn(NetPath, Mode, Metric) -> String) {
    *s += "| path | portfwd vs |";
    for metric in MAIN_METRICS {
        write!(s, " {} |", metric.label()).expect("writing to a String");
    }
    *s += "\n|---|---|";
    *s += &"---|".repeat(MAIN_METRICS.len());
    *s += "\n";
    for &path in &plan.paths {
        for &mode in plan.modes.iter().filter(|&&m| m != Mode::Portfwd) {
            write!(s, "| {} | {} |", path.name(), mode.name()).expect("writing to a String");
            for metric in MAIN_METRICS {
                write!(s, " {} |", cell(path, mode, metric)).expect("writing to a String");
            }
            *s += "\n";
        }
    }
    *s += "\n";
}

/// `median× (min–max)` of ratios.
pub(super) fn ratios_cell(ratios: &[f64]) -> String {
    let (min, max) = min_max(ratios);
    format!("{} ({:.2}–{:.2})", ratio(median(ratios)), min, max)
}

const PATH_TITLES: [&str; 2] = [
    "External path: client namespace → host address:port (direct: → container address)",
    "Local path: host process → 127.0.0.1:port (direct: → container address)",
];

/// The main table's columns.
const MAIN_METRICS: [Metric; 8] = [
    Metric::TcpGbps,
    Metric::KaRps,
    Metric::KaP50Ms,
    Metric::KaP99Ms,
    Metric::ConnPerS,
    Metric::ConnP99Ms,
    Metric::UdpRps,
    Metric::Udp4kRps,
];

pub(crate) fn markdown(plan: &Plan, r: &Results, m: &Machine, elapsed: f64) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "Machine: {}, {} CPUs, {}, kernel {}. Command: `{}` ({:.1} min).\n",
        m.cpu,
        m.cpus,
        m.memory,
        m.kernel,
        plan.command,
        elapsed / 60.0
    )
    .expect("writing to a String");
    writeln!(
        s,
        "Each cell: median of {} repetition{} (min–max), each {} s, modes interleaved \
         (every configuration once per repetition, order alternating, portfwd beside \
         direct); `[0.97×]` is the \
         ratio to `direct` (for latencies, lower is better). wrk: 1 thread, {} connections, \
         a 3-byte nginx response (1 worker); new connections: `Connection: close`. UDP: \
         sequential request/response on one connected socket. SYN rtx: client SYN \
         retransmissions in each repetition's wrk runs (non-zero marks a disturbed run). \
         Every process the bench starts runs at nice {}.\n",
        plan.reps,
        if plan.reps == 1 { "" } else { "s" },
        plan.secs,
        plan.connections,
        plan.nice
    )
    .expect("writing to a String");
    if !r.load.is_empty() {
        let (min, max) = min_max(&r.load);
        writeln!(
            s,
            "1-minute load average before each configuration: {min:.2}–{max:.2} \
             (the benchmark itself brings it to about 2 on its own).\n"
        )
        .expect("writing to a String");
    }

    // A --control-plane run measures no traffic: no traffic tables.
    let traffic = !plan.control_plane;
    let measured = |&(path, _): &(NetPath, &str)| traffic && plan.paths.contains(&path);
    for (path, title) in PATHS.into_iter().zip(PATH_TITLES).filter(measured) {
        writeln!(s, "#### {title}\n").expect("writing to a String");
        s += "| mode | mappings |";
        for metric in MAIN_METRICS {
            write!(s, " {} |", metric.label()).expect("writing to a String");
        }
        s += " SYN rtx |\n|---|---|";
        s += &"---|".repeat(MAIN_METRICS.len() + 1);
        s += "\n";
        for &mode in &plan.modes {
            let others = base_others(mode);
            write!(s, "| {} | {} |", mode.name(), others_label(mode, others))
                .expect("writing to a String");
            for metric in MAIN_METRICS {
                let samples = r.series(mode, path, others, metric);
                if samples.is_empty() {
                    s += " – |";
                    continue;
                }
                write!(s, " {}", cell(metric, samples)).expect("writing to a String");
                if mode != Mode::Direct
                    && let Some(x) = r.vs_direct(mode, path, metric)
                {
                    write!(s, " [{}]", ratio(x)).expect("writing to a String");
                }
                s += " |";
            }
            let syn = r.syn_retrans.get(&(mode, path, others));
            let syn: Vec<String> = syn.into_iter().flatten().map(|n| n.to_string()).collect();
            writeln!(s, " {} |", syn.join(", ")).expect("writing to a String");
        }
        s += "\n";
    }

    if traffic && plan.modes.contains(&Mode::Portfwd) && plan.modes.len() > 1 {
        s += "#### portfwd relative to each mode (ratio of medians; latency: lower is better)\n\n";
        versus_table(&mut s, plan, |path, mode, metric| {
            r.main(Mode::Portfwd, path, metric)
                .zip(r.main(mode, path, metric))
                .map_or("–".into(), |(a, b)| ratio(a / b))
        });
        s += "#### portfwd relative to each mode, repetition by repetition (median of the \
              repetitions' ratios, min–max)\n\n";
        s += "Each repetition's portfwd figure against the same repetition's figure of the \
              other mode: slow drift on the machine moves both alike, where the medians of \
              two modes may come from repetitions far apart.\n\n";
        versus_table(&mut s, plan, |path, mode, metric| {
            r.per_repetition(mode, path, metric)
                .map_or("–".into(), |ratios| ratios_cell(&ratios))
        });
    }

    let scaled: Vec<Mode> = plan.modes.iter().copied().filter(|m| m.scales()).collect();
    // A focused run (--paths, --loads) measured its figures alone.
    if !scaled.is_empty() && !plan.focused {
        const SCALE_METRICS: [Metric; 4] = [
            Metric::ConnPerS,
            Metric::ConnP99Ms,
            Metric::KaRps,
            Metric::KaP99Ms,
        ];
        if traffic {
            s += "#### Scale: N other mappings installed (change: vs the mode's own figure with 1 other)\n\n";
            s += "| path | mode | other mappings |";
            for metric in SCALE_METRICS {
                write!(s, " {} |", metric.label()).expect("writing to a String");
            }
            s += " SYN rtx |\n|---|---|---|";
            s += &"---|".repeat(SCALE_METRICS.len() + 1);
            s += "\n";
            let mut ns = vec![1];
            ns.extend(&plan.scales);
            for path in PATHS {
                for &mode in &scaled {
                    for &n in &ns {
                        write!(s, "| {} | {} | {n} |", path.name(), mode.name())
                            .expect("writing to a String");
                        for metric in SCALE_METRICS {
                            let samples = r.series(mode, path, n, metric);
                            if samples.is_empty() {
                                s += " – |";
                                continue;
                            }
                            write!(s, " {}", cell(metric, samples)).expect("writing to a String");
                            if n != 1
                                && let Some(base) = r.med(mode, path, 1, metric)
                            {
                                write!(s, " [{:+.1}%]", (median(samples) / base - 1.0) * 100.0)
                                    .expect("writing to a String");
                            }
                            s += " |";
                        }
                        let syn = r.syn_retrans.get(&(mode, path, n));
                        let syn: Vec<String> =
                            syn.into_iter().flatten().map(|n| n.to_string()).collect();
                        writeln!(s, " {} |", syn.join(", ")).expect("writing to a String");
                    }
                }
            }
            s += "\n";
        }

        writeln!(
            s,
            "#### Control plane: one CLI process each, wall time in ms, median (min–max)\n"
        )
        .expect("writing to a String");
        writeln!(
            s,
            "| mode | install {SCALE} at once | add one ({SCALE} installed) | remove one ({SCALE} installed) | how |"
        ).expect("writing to a String");
        s += "|---|---|---|---|---|\n";
        for &mode in &scaled {
            let how = match mode {
                Mode::Iptables => "`iptables-restore --noflush` / `iptables -A` / `iptables -D`",
                Mode::Nft => "one `nft -f` / `nft add element` / `nft delete element`",
                _ => {
                    "one `portfwd map CTR 0.0.0.0:20000-29999:20000-29999` / `portfwd map` / `portfwd unmap`"
                }
            };
            write!(s, "| {} |", mode.name()).expect("writing to a String");
            for update in [Update::InstallAll, Update::AddOne, Update::RemoveOne] {
                match r.updates.get(&(mode, update)) {
                    Some(v) if !v.is_empty() => {
                        let (min, max) = min_max(v);
                        write!(s, " {:.2} ({min:.2}–{max:.2}) |", median(v))
                            .expect("writing to a String");
                    }
                    _ => s += " – |",
                }
            }
            writeln!(s, " {how} |").expect("writing to a String");
        }
        s += "\n";
        let cell = |mode: Mode, update: Update| match r.updates.get(&(mode, update)) {
            Some(v) if !v.is_empty() => {
                let (min, max) = min_max(v);
                format!(" {:.2} ({min:.2}–{max:.2}) |", median(v))
            }
            _ => " – |".to_owned(),
        };
        let more = [Update::AutoPorts, Update::Impossible, Update::ApplyOne];
        if scaled
            .iter()
            .any(|&m| more.iter().any(|&u| r.updates.contains_key(&(m, u))))
        {
            writeln!(
                s,
                "| mode | {SCALE} automatic ports | impossible request (fails) | apply -f changing one of {SCALE} |\n|---|---|---|---|"
            )
            .expect("writing to a String");
            for &mode in &scaled {
                write!(s, "| {} |", mode.name()).expect("writing to a String");
                for update in more {
                    s += &cell(mode, update);
                }
                s += "\n";
            }
            s += "\n";
        }
        if scaled
            .iter()
            .any(|&m| r.updates.contains_key(&(m, Update::AddOneAt(CURVE[0]))))
        {
            s += "Scale curve: add one / remove one with N installed, ms, median (min–max)\n\n| mode | operation |";
            for n in CURVE {
                write!(s, " {n} installed |").expect("writing to a String");
            }
            s += "\n|---|---|";
            s += &"---|".repeat(CURVE.len());
            s += "\n";
            for &mode in &scaled {
                for (op, make) in [
                    ("add one", Update::AddOneAt as fn(usize) -> Update),
                    ("remove one", Update::RemoveOneAt),
                ] {
                    write!(s, "| {} | {op} |", mode.name()).expect("writing to a String");
                    for n in CURVE {
                        s += &cell(mode, make(n));
                    }
                    s += "\n";
                }
            }
            s += "\n";
        }
    }

    if !r.bpf.is_empty() {
        s += "#### portfwd's eBPF programs while forwarding new connections (`kernel.bpf_stats_enabled`, one wrk run per path)\n\n";
        s += "| path | program | runs per connection | ns per run | ns per connection |\n|---|---|---|---|---|\n";
        for c in &r.bpf {
            writeln!(
                s,
                "| {} | {} | {:.1} | {:.0} | {:.0} |",
                c.path.name(),
                c.program,
                c.calls_per_conn,
                c.ns_per_call,
                c.calls_per_conn * c.ns_per_call
            )
            .expect("writing to a String");
        }
        s += "\n";
    }

    for (title, checks) in [
        ("Targets of issue 11 (end to end)", issue_11(r)),
        ("Targets of issue 6", targets(r)),
    ] {
        check_table(&mut s, title, &checks);
    }
    s
}

fn check_table(s: &mut String, title: &str, checks: &[Check]) {
    if checks.is_empty() {
        return;
    }
    writeln!(
        s,
        "#### {title}\n\n| target | measured | met |\n|---|---|---|"
    )
    .expect("writing to a String");
    for c in checks {
        let met = match c.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        writeln!(s, "| {} | {} | {met} |", c.what, c.measured).expect("writing to a String");
    }
    *s += "\n";
}

pub(crate) fn json(plan: &Plan, r: &Results, m: &Machine, elapsed: f64) -> Value {
    let series: Vec<Value> = r
        .samples
        .iter()
        .map(|(&(mode, path, others, metric), samples)| {
            let (min, max) = min_max(samples);
            let direct = r.main(Mode::Direct, path, metric);
            json!({
                "mode": mode,
                "path": path,
                "other_mappings": others,
                "metric": metric,
                "samples": samples,
                "median": median(samples),
                "min": min,
                "max": max,
                "ratio_to_direct": direct.map(|d| median(samples) / d),
                "portfwd_ratio_per_repetition": (mode != Mode::Portfwd
                    && others == base_others(mode))
                    .then(|| r.per_repetition(mode, path, metric))
                    .flatten(),
                "syn_retrans": r.syn_retrans.get(&(mode, path, others)),
            })
        })
        .collect();
    let updates: Vec<Value> = r
        .updates
        .iter()
        .map(|(&(mode, update), v)| {
            let (min, max) = min_max(v);
            json!({
                "mode": mode,
                "operation": format!("{update:?}"),
                "mappings": SCALE,
                "samples_ms": v,
                "median_ms": median(v),
                "min_ms": min,
                "max_ms": max,
            })
        })
        .collect();
    json!({
        "command": plan.command,
        "machine": m,
        "repetitions": plan.reps,
        "seconds_per_figure": plan.secs,
        "wrk_connections": plan.connections,
        "nice": plan.nice,
        "modes": plan.modes,
        "scales": plan.scales,
        "elapsed_s": elapsed,
        "load_average_before_trials": r.load,
        "results": series,
        "errors": r.errors.iter().map(|(&(mode, path, others), &n)| json!({
            "mode": mode, "path": path, "other_mappings": others, "failed_requests": n,
        })).collect::<Vec<_>>(),
        "updates": updates,
        "bpf_programs": r.bpf,
        "targets": targets(r),
        "targets_issue_11": issue_11(r),
    })
}
