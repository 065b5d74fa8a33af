//! `cargo xtask bench`: portfwd side by side with direct routing, iptables
//! DNAT, an nftables DNAT map and docker-proxy, on one topology of network
//! namespaces (see `ns`), with repetitions interleaved across modes.

mod chart;
mod measure;
mod modes;
mod ns;
mod report;
mod rootless;
mod runner;
mod targets;
mod tool;
mod updates;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub(crate) use tool::{Tool, run as run_tool};

use measure::{Load, Metric, NetPath, PATHS, TRAFFIC, Traffic};
use modes::{ALL_MODES, Env, Mode};
use ns::{Topo, check};
use runner::Bench;

use crate::{build, interrupt, is_root, root, run, setup, stdout_of};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A short smoke run: one repetition of 1 s per figure, scale at 10,000 only.
    #[arg(long)]
    quick: bool,
    /// Only the control-plane section (updates, the scale curve), no traffic.
    #[arg(long, conflicts_with_all = ["paths", "loads"])]
    control_plane: bool,
    /// Modes to compare, comma-separated [default: all]: direct, iptables, nft, docker-proxy, portfwd.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Only these paths, comma-separated [default: both]: external, local.
    /// With --paths or --loads the run measures those figures alone: no
    /// scale trials, control-plane section or eBPF profile.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Only these loads, comma-separated [default: all]: tcp, keep-alive,
    /// new-connections, udp, udp-4k.
    #[arg(long, value_delimiter = ',')]
    loads: Vec<String>,
    /// Repetitions of every figure [default: 3; --quick: 1].
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per figure [default: 3; --quick: 1].
    #[arg(long)]
    secs: Option<u64>,
    /// Connections wrk keeps open.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Where results.json, results.md and chart.png go [default: target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Nice value of the servers, clients, proxies and CLIs the bench runs: on a
    /// machine shared with other work, a negative value keeps that work from
    /// taking the CPUs from the measurement (every mode alike).
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    nice: i32,
    /// Run clients on CPU 0 and servers and docker-proxy on CPU 1 (with two
    /// CPUs or more), so that repetitions place them alike.
    #[arg(long)]
    pin: bool,
    /// A portfwd binary to measure instead of building this tree's (release).
    #[arg(long, value_name = "PATH")]
    portfwd: Option<PathBuf>,
    /// Prefix of the namespaces' names (two runs at once need two prefixes).
    #[arg(long, default_value = "pfb")]
    prefix: String,
    /// Only the cost of each TC program per packet, through BPF_PROG_TEST_RUN
    /// on crafted frames (a million runs per case, timed by the kernel; no
    /// namespaces, no traffic): the figure to optimise against.
    #[arg(long)]
    prog: bool,
    /// With --prog: another build's eBPF object (e.g. main's) to measure beside
    /// this one, in turns.
    #[arg(long, value_name = "OBJECT", requires = "prog")]
    against: Option<PathBuf>,
    /// Only the rootless comparison: a port of an unprivileged user's
    /// RootlessKit namespace published by RootlessKit's builtin port driver
    /// and by portfwd's rootless path (`serve` + `map --netns`), in turns.
    #[arg(long, conflicts_with_all = ["control_plane", "modes", "prog", "paths", "loads"])]
    rootless: bool,
}

/// The key of one series of samples.
pub(crate) type Key = (Mode, NetPath, usize, Metric);

/// The timed control-plane operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Update {
    /// Add one mapping while 10,000 exist.
    AddOne,
    /// Remove one mapping while 10,000 exist.
    RemoveOne,
    /// Install 10,000 mappings at once.
    InstallAll,
    /// 10,000 automatic host ports in one command (10,000 installed).
    AutoPorts,
    /// More automatic ports than the range holds: must fail.
    Impossible,
    /// `apply -f` of the 10,000-mapping set with one mapping changed.
    ApplyOne,
    /// Add one / remove one with this many installed (the scale curve).
    AddOneAt(usize),
    RemoveOneAt(usize),
}

/// How many mappings are installed for each point of the scale curve.
pub(crate) const CURVE: [usize; 4] = [1, 1_000, 10_000, 50_000];

pub(crate) const SCALE: usize = 10_000;

#[derive(Default)]
pub(crate) struct Results {
    pub(crate) samples: BTreeMap<Key, Vec<f64>>,
    /// SYN retransmissions of each trial's wrk runs (client side).
    pub(crate) syn_retrans: BTreeMap<(Mode, NetPath, usize), Vec<u64>>,
    /// Failed requests (socket errors, non-2xx) in wrk runs.
    pub(crate) errors: BTreeMap<(Mode, NetPath, usize), u64>,
    pub(crate) updates: BTreeMap<(Mode, Update), Vec<f64>>,
    /// Per-program eBPF cost while portfwd forwards new connections.
    pub(crate) bpf: Vec<report::ProgCost>,
    /// The 1-minute load average before each trial: above ~2 on 2 CPUs,
    /// something else was running (the bench itself keeps it near 2).
    pub(crate) load: Vec<f64>,
}

/// Settings of the run, as recorded in the results.
pub(crate) struct Plan {
    pub(crate) modes: Vec<Mode>,
    pub(crate) paths: Vec<NetPath>,
    pub(crate) loads: Vec<Traffic>,
    /// Only some paths or loads were asked for: those figures alone.
    pub(crate) focused: bool,
    pub(crate) nice: i32,
    pub(crate) reps: usize,
    pub(crate) secs: u64,
    pub(crate) connections: u32,
    pub(crate) scales: Vec<usize>,
    pub(crate) command: String,
    pub(crate) quick: bool,
    pub(crate) control_plane: bool,
}

/// One configuration measured in a repetition.
struct Trial {
    mode: Mode,
    others: usize,
    /// Every metric; scale trials measure only the wrk figures.
    full: bool,
}

pub(crate) fn bench(args: Args) -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    if args.prog {
        return prog_cost(args.against.as_deref());
    }
    let plan = Plan::new(&args)?;
    ns::NICE.store(args.nice, Ordering::Relaxed);
    ns::PIN.store(args.pin, Ordering::Relaxed);
    setup::install_bench_debs()?;
    let target = crate::target_dir();
    let portfwd = match &args.portfwd {
        Some(path) => std::path::absolute(path)?,
        None => {
            build::build(true)?;
            target.join("release/portfwd")
        }
    };
    let out = std::path::absolute(args.out.unwrap_or_else(|| target.join("bench")))?;
    std::fs::create_dir_all(&out)?;
    if args.rootless {
        interrupt::catch()?;
        let topo = Topo::new(&args.prefix)?;
        return rootless::bench(&plan, &args.prefix, &topo, portfwd, &out);
    }
    let docker_proxy = if plan.modes.contains(&Mode::DockerProxy) {
        Some(docker_proxy(&target.join("bench-tools"))?)
    } else {
        None
    };
    let work = out.join("run");
    std::fs::create_dir_all(&work)?;
    // Our own UDP tools run from a private copy of this binary: a cargo build
    // elsewhere may replace target/debug/xtask while we run.
    let tool_copy = work.join("xtask-bench-tool");
    std::fs::remove_file(&tool_copy).ok();
    std::fs::copy(std::env::current_exe()?, &tool_copy)
        .context("copying the xtask binary for the bench tools")?;

    interrupt::catch()?;
    let topo = Topo::new(&args.prefix)?;
    let mut bench = Bench {
        env: Env {
            topo: &topo,
            portfwd,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/portfwd-bench-{}", args.prefix)),
            docker_proxy,
        },
        xtask: tool_copy,
        servers: Vec::new(),
        results: Results::default(),
        load: Load {
            secs: plan.secs,
            connections: plan.connections,
        },
        bpf_stats_restore: None,
    };
    bench.cleanup();
    if let Some(load) = loadavg().filter(|&l| l > 0.5) {
        println!(
            "bench: warning: load average {load:.2} before starting: other work on this \
             machine will disturb the figures"
        );
    }
    let started = Instant::now();
    let result = bench.run(&plan, &work);
    let results = std::mem::take(&mut bench.results);
    drop(bench);
    interrupt::check()?;
    result?;

    let elapsed = started.elapsed().as_secs_f64();
    write_results(&plan, &results, &out, &target, elapsed)
}

impl Plan {
    fn new(args: &Args) -> Result<Self> {
        let focused = !args.paths.is_empty() || !args.loads.is_empty();
        let modes = chosen(&args.modes, &ALL_MODES, Mode::name, "mode")?;
        let paths = chosen(&args.paths, &PATHS, NetPath::name, "path")?;
        let loads = chosen(&args.loads, &TRAFFIC, Traffic::name, "load")?;
        Ok(Plan {
            paths,
            loads,
            focused,
            reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
            secs: args.secs.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
            connections: args.connections,
            scales: if focused {
                Vec::new()
            } else if args.quick {
                vec![SCALE]
            } else {
                vec![1_000, SCALE]
            },
            command: format!(
                "cargo xtask {}",
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            ),
            modes,
            nice: args.nice,
            quick: args.quick,
            control_plane: args.control_plane,
        })
    }
}

/// The values of `all` that `names` (a comma-separated option) name by
/// `name`, sorted, each once; all of them when it names none.
fn chosen<T: Copy + Ord>(
    names: &[String],
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<Vec<T>> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    let mut chosen = names
        .iter()
        .map(|text| {
            let text = text.trim();
            all.iter()
                .copied()
                .find(|&v| name(v) == text)
                .with_context(|| {
                    let names: Vec<_> = all.iter().map(|&v| name(v)).collect();
                    format!("unknown {what} {text:?} ({what}s: {})", names.join(", "))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    chosen.sort();
    chosen.dedup();
    Ok(chosen)
}

/// results.md (also printed), results.json and chart.png under `out`.
fn write_results(
    plan: &Plan,
    results: &Results,
    out: &Path,
    target: &Path,
    elapsed: f64,
) -> Result<()> {
    let machine = report::machine(docker_proxy_version(&target.join("bench-tools")));
    let markdown = report::markdown(plan, results, &machine, elapsed);
    println!("\n{markdown}");
    std::fs::write(out.join("results.md"), &markdown)?;
    let json = report::json(plan, results, &machine, elapsed);
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let mut written = vec![out.join("results.md"), out.join("results.json")];
    // The chart's panels are every path and load: a focused run's empty
    // ones have no range (plotters then looped without end).
    if !plan.focused {
        let png = out.join("chart.png");
        match chart::draw(plan, results, &png) {
            Ok(()) => written.push(png),
            Err(e) => eprintln!("bench: no chart: {e:#}"),
        }
    }
    let written: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("results: {}", written.join(", "));
    Ok(())
}

/// `cargo xtask test`'s smoke runs: `bench --quick --modes direct,portfwd`,
/// then `bench --quick --rootless` (about 20 s), must complete and produce
/// their tables (no speed is asserted). Their output goes to a log, so that
/// the test summary stays readable. They run `portfwd`, the debug build the
/// tests use: a release build of its own cost CI a minute, and the smoke
/// times nothing.
pub(crate) fn smoke(portfwd: &Path) -> Result<()> {
    let target = crate::target_dir();
    let out = target.join("bench-smoke");
    let portfwd = portfwd.to_str().context("the portfwd binary's path")?;
    smoke_run(
        &out,
        &["--modes", "direct,portfwd", "--portfwd", portfwd],
        "results.json",
        "| portfwd |",
    )?;
    smoke_run(
        &out,
        &["--rootless", "--portfwd", portfwd],
        "rootless.json",
        "| portfwd rootless |",
    )
}

/// One smoke run, `bench --quick EXTRA`, whose results must hold rows in
/// `json` and a row `row` in the matching table.
fn smoke_run(out: &Path, extra: &[&str], json: &str, row: &str) -> Result<()> {
    let table = out.join(json.replace(".json", ".md"));
    std::fs::remove_file(out.join(json)).ok();
    std::fs::create_dir_all(out)?;
    let log_path = out.join(json.replace(".json", "-log.txt"));
    let log = std::fs::File::create(&log_path)?;
    let command = format!("cargo xtask bench --quick {}", extra.join(" "));
    println!("bench smoke: {command} (log: {})", log_path.display());
    let started = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args(["bench", "--quick", "--prefix", "pfs"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    let rows = std::fs::read_to_string(out.join(json))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json["results"].as_array().map(Vec::len))
        .unwrap_or(0);
    let text = std::fs::read_to_string(&table).unwrap_or_default();
    if !status.success() || rows == 0 || !text.contains(row) {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  {line}");
        }
        bail!("the benchmark's smoke run `{command}` failed ({status}, {rows} result rows)");
    }
    println!(
        "bench smoke: ok, {rows} result series in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        table.display()
    );
    Ok(())
}

/// `bench --prog`: the ignored test that measures each TC program through
/// BPF_PROG_TEST_RUN (portfwd's `datapath::tc_cost`, which reuses the
/// crafted frames of the packet cases), with this tree's eBPF object.
fn prog_cost(against: Option<&Path>) -> Result<()> {
    let obj = build::build_ebpf(true)?;
    let mut test = crate::cargo();
    if let Some(other) = against {
        if !other.is_file() {
            bail!("--against {}: no such file", other.display());
        }
        test.env("PORTFWD_PROG_AGAINST", std::path::absolute(other)?);
    }
    if let Some(load) = loadavg().filter(|&l| l > 1.0) {
        println!(
            "bench: note: load average {load:.2}: the kernel times each run itself, \
             but a busy machine still shifts the figures a little"
        );
    }
    run(test
        .current_dir(root())
        .env(build::EBPF_OBJ_ENV, &obj)
        .args(["test", "--quiet", "-p", "portfwd", "--lib", "--"])
        .args(["--ignored", "--exact", "datapath::tc_cost::tc_program_cost"])
        .args(["--nocapture", "--test-threads=1"]))
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `bpftool prog show`: id → (name, run_time_ns, run_cnt).
fn prog_stats() -> Result<BTreeMap<u64, (String, u64, u64)>> {
    let out = check(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let json: serde_json::Value = serde_json::from_str(&out).context("bpftool -j prog show")?;
    let mut map = BTreeMap::new();
    for prog in json.as_array().into_iter().flatten() {
        let Some(id) = prog["id"].as_u64() else {
            continue;
        };
        let name = prog["name"].as_str().unwrap_or("").to_owned();
        let ns = prog["run_time_ns"].as_u64().unwrap_or(0);
        let cnt = prog["run_cnt"].as_u64().unwrap_or(0);
        map.insert(id, (name, ns, cnt));
    }
    Ok(map)
}

/// The real docker-proxy, from Debian's docker.io package (extracted, not
/// installed: no Docker daemon is involved).
fn docker_proxy(dir: &Path) -> Result<PathBuf> {
    setup::file_from_deb("docker.io", "usr/sbin/docker-proxy", dir)
}

fn docker_proxy_version(dir: &Path) -> Option<String> {
    let deb = setup::newest_deb(dir, "docker.io").ok()?;
    let out = stdout_of(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Version"),
    )
    .ok()?;
    Some(out.trim().to_owned())
}

/// One worker, a 3-byte answer, keep-alive without limit.
const NGINX_CONF: &str = r#"daemon off;
master_process on;
worker_processes 1;
pid nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {
        listen 80 backlog=4096;
        location / { return 200 "ok\n"; }
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<String> {
        text.split(',').map(str::to_owned).collect()
    }

    #[test]
    fn modes_paths_and_loads_by_name() {
        for path in PATHS {
            let chosen = chosen(&names(path.name()), &PATHS, NetPath::name, "path");
            assert_eq!(chosen.unwrap(), [path]);
        }
        for load in TRAFFIC {
            let chosen = chosen(&names(load.name()), &TRAFFIC, Traffic::name, "load");
            assert_eq!(chosen.unwrap(), [load]);
        }
        let error = chosen(&names("keepalive"), &TRAFFIC, Traffic::name, "load")
            .unwrap_err()
            .to_string();
        assert!(error.contains("keep-alive, new-connections"), "{error}");
        assert!(chosen(&names("loopback"), &PATHS, NetPath::name, "path").is_err());
        // Sorted, each once; all when none is named.
        let modes = chosen(
            &names("portfwd, direct,portfwd"),
            &ALL_MODES,
            Mode::name,
            "mode",
        );
        assert_eq!(modes.unwrap(), [Mode::Direct, Mode::Portfwd]);
        assert_eq!(chosen(&[], &PATHS, NetPath::name, "path").unwrap(), PATHS);
    }
}
