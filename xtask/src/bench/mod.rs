//! `cargo xtask bench`: portfwd side by side with direct routing, iptables
//! DNAT, an nftables DNAT map and docker-proxy, on one topology of network
//! namespaces (see `ns`), with repetitions interleaved across modes.

mod chart;
mod measure;
mod modes;
mod ns;
mod report;
mod tool;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

pub use tool::{Tool, run as run_tool};

use measure::{Load, Metric, NetPath, PATHS, Target};
use modes::{ALL_MODES, Env, Mode, ONE};
use ns::{Topo, check, in_ns};

use crate::{build, is_root, root, run, setup, stdout_of};

#[derive(clap::Args)]
pub struct Args {
    /// A short smoke run: one repetition of 1 s per figure, scale at 10,000 only.
    #[arg(long)]
    quick: bool,
    /// Modes to compare, comma-separated [default: all]: direct, iptables, nft, docker-proxy, portfwd.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
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
    /// A portfwd binary to measure instead of building this tree's (release).
    #[arg(long, value_name = "PATH")]
    portfwd: Option<PathBuf>,
    /// Prefix of the namespaces' names (two runs at once need two prefixes).
    #[arg(long, default_value = "pfb")]
    prefix: String,
}

/// The key of one series of samples.
pub type Key = (Mode, NetPath, usize, Metric);

/// The timed control-plane operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Update {
    /// Add one mapping while 10,000 exist.
    AddOne,
    /// Remove one mapping while 10,000 exist.
    RemoveOne,
    /// Install 10,000 mappings at once.
    InstallAll,
}

pub const SCALE: usize = 10_000;

#[derive(Default)]
pub struct Results {
    pub samples: BTreeMap<Key, Vec<f64>>,
    /// SYN retransmissions of each trial's wrk runs (client side).
    pub syn_retrans: BTreeMap<(Mode, NetPath, usize), Vec<u64>>,
    /// Failed requests (socket errors, non-2xx) in wrk runs.
    pub errors: BTreeMap<(Mode, NetPath, usize), u64>,
    pub updates: BTreeMap<(Mode, Update), Vec<f64>>,
    /// Per-program eBPF cost while portfwd forwards new connections.
    pub bpf: Vec<report::ProgCost>,
    /// The 1-minute load average before each trial: above ~2 on 2 CPUs,
    /// something else was running (the bench itself keeps it near 2).
    pub load: Vec<f64>,
}

/// Settings of the run, as recorded in the results.
pub struct Plan {
    pub modes: Vec<Mode>,
    pub nice: i32,
    pub reps: usize,
    pub secs: u64,
    pub connections: u32,
    pub scales: Vec<usize>,
    pub command: String,
    pub quick: bool,
}

/// One configuration measured in a repetition.
struct Trial {
    mode: Mode,
    others: usize,
    /// Every metric; scale trials measure only the wrk figures.
    full: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn bench(args: Args) -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads eBPF programs: run it as root");
    }
    let modes = if args.modes.is_empty() {
        ALL_MODES.to_vec()
    } else {
        let mut m = args
            .modes
            .iter()
            .map(|s| Mode::parse(s.trim()))
            .collect::<Result<Vec<_>>>()?;
        m.sort();
        m.dedup();
        m
    };
    let plan = Plan {
        reps: args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        secs: args.secs.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        connections: args.connections,
        scales: if args.quick {
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
    };

    ns::NICE.store(args.nice, Ordering::Relaxed);
    setup::install_bench_debs()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or(root().join("target"), |d| root().join(d));
    let portfwd = match &args.portfwd {
        Some(path) => std::path::absolute(path)?,
        None => {
            build::build(true)?;
            target.join("release/portfwd")
        }
    };
    let out = std::path::absolute(args.out.unwrap_or_else(|| target.join("bench")))?;
    std::fs::create_dir_all(&out)?;
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
    let _ = std::fs::remove_file(&tool_copy);
    std::fs::copy(std::env::current_exe()?, &tool_copy)
        .context("copying the xtask binary for the bench tools")?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
        );
    }
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
    interrupted()?;
    result?;

    let elapsed = started.elapsed().as_secs_f64();
    let machine = report::machine(docker_proxy_version(&target.join("bench-tools")));
    let markdown = report::markdown(&plan, &results, &machine, elapsed);
    println!("\n{markdown}");
    std::fs::write(out.join("results.md"), &markdown)?;
    let json = report::json(&plan, &results, &machine, elapsed);
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let png = out.join("chart.png");
    if let Err(e) = chart::draw(&plan, &results, &png) {
        eprintln!("bench: no chart: {e:#}");
    }
    println!(
        "results: {}, {}, {}",
        out.join("results.md").display(),
        out.join("results.json").display(),
        png.display()
    );
    Ok(())
}

/// `cargo xtask test`'s smoke run: `bench --quick --modes direct,portfwd`
/// must complete and produce a table (no speed is asserted). Its output goes
/// to a log, so that the test summary stays readable.
pub fn smoke() -> Result<()> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or(root().join("target"), |d| root().join(d));
    let out = target.join("bench-smoke");
    let _ = std::fs::remove_file(out.join("results.json"));
    std::fs::create_dir_all(&out)?;
    let log_path = out.join("log.txt");
    let log = std::fs::File::create(&log_path)?;
    println!(
        "bench smoke: cargo xtask bench --quick --modes direct,portfwd (log: {})",
        log_path.display()
    );
    let started = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args([
            "bench",
            "--quick",
            "--modes",
            "direct,portfwd",
            "--prefix",
            "pfs",
        ])
        .arg("--out")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    let rows = std::fs::read_to_string(out.join("results.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json["results"].as_array().map(Vec::len))
        .unwrap_or(0);
    let table = std::fs::read_to_string(out.join("results.md")).unwrap_or_default();
    if !status.success() || rows == 0 || !table.contains("| portfwd |") {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  {line}");
        }
        bail!("the benchmark's smoke run failed ({status}, {rows} result rows)");
    }
    println!(
        "bench smoke: ok, {rows} result series in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        out.join("results.md").display()
    );
    Ok(())
}

/// Owns everything the run creates; Drop removes it on success, error or Ctrl-C.
struct Bench<'a> {
    env: Env<'a>,
    xtask: PathBuf,
    servers: Vec<Child>,
    results: Results,
    load: Load,
    /// kernel.bpf_stats_enabled as it was, while we have it on.
    bpf_stats_restore: Option<String>,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Bench<'_> {
    fn topo(&self) -> &Topo {
        self.env.topo
    }

    /// Removes what this run (or an earlier one killed hard) left.
    fn cleanup(&mut self) {
        if let Some(old) = self.bpf_stats_restore.take() {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", old);
        }
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        self.servers.clear();
        if self.env.bpffs.exists() {
            let _ = Command::new(&self.env.portfwd)
                .arg("--bpffs")
                .arg(&self.env.bpffs)
                .arg("down")
                .stdout(Stdio::null())
                .status();
        }
        self.topo().destroy();
    }

    fn run(&mut self, plan: &Plan, work: &Path) -> Result<()> {
        println!(
            "==> topology: namespaces {}, {}, {} on 10.{}.0.0/16",
            self.topo().host,
            self.topo().ctr,
            self.topo().cli,
            self.topo().net
        );
        self.topo().create()?;
        self.start_servers(work)?;

        let mut trials = Vec::new();
        for &mode in &plan.modes {
            let others = if mode.scales() { 1 } else { 0 };
            trials.push(Trial {
                mode,
                others,
                full: true,
            });
        }
        for &n in &plan.scales {
            for &mode in plan.modes.iter().filter(|m| m.scales()) {
                trials.push(Trial {
                    mode,
                    others: n,
                    full: false,
                });
            }
        }
        for rep in 0..plan.reps {
            // Interleaved: every configuration once per repetition, in an
            // order that alternates direction and shifts, so that no mode
            // always runs first, last or after the same one.
            let mut order: Vec<&Trial> = trials.iter().collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            let len = order.len();
            order.rotate_left((rep / 2) % len);
            for trial in order {
                interrupted()?;
                self.trial(trial, rep, plan)?;
            }
        }
        for &mode in plan.modes.iter().filter(|m| m.scales()) {
            interrupted()?;
            self.updates(mode, plan, work)?;
        }
        if !plan.quick && plan.modes.contains(&Mode::Portfwd) {
            interrupted()?;
            self.profile()?;
        }
        Ok(())
    }

    fn start_servers(&mut self, work: &Path) -> Result<()> {
        let ctr = self.topo().ctr.clone();
        let nginx_dir = work.join("nginx");
        std::fs::create_dir_all(nginx_dir.join("tmp"))?;
        let conf = nginx_dir.join("nginx.conf");
        std::fs::write(&conf, NGINX_CONF)?;
        let spawn = |cmd: &mut Command| -> Result<Child> {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                // Its own process group: Ctrl-C stops the measurement, the
                // guard stops the servers.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", crate::display(cmd)))
        };
        let nginx = spawn(
            in_ns(&ctr, "nginx")
                .arg("-p")
                .arg(&nginx_dir)
                .arg("-c")
                .arg(&conf)
                .args(["-e", "stderr"]),
        )?;
        self.servers.push(nginx);
        let iperf = spawn(in_ns(&ctr, "iperf3").args(["-s", "-p", "5201"]))?;
        self.servers.push(iperf);
        let echo = spawn(
            in_ns(&ctr, &self.xtask)
                .args(["bench-tool", "udp-echo", "0.0.0.0:5353"])
                .stderr(Stdio::null()),
        )?;
        self.servers.push(echo);
        ns::wait_listening(&ctr, "t", 80)?;
        ns::wait_listening(&ctr, "t", 5201)?;
        ns::wait_listening(&ctr, "u", 5353)?;
        Ok(())
    }

    fn record(&mut self, key: Key, value: f64) {
        self.results.samples.entry(key).or_default().push(value);
    }

    fn trial(&mut self, trial: &Trial, rep: usize, plan: &Plan) -> Result<()> {
        if let Some(load) = loadavg() {
            self.results.load.push(load);
        }
        let active = self.env.setup(trial.mode, trial.others)?;
        let result = self.measure(trial, rep, plan);
        self.env.teardown(active);
        result
    }

    fn measure(&mut self, trial: &Trial, rep: usize, plan: &Plan) -> Result<()> {
        let Trial { mode, others, full } = *trial;
        for path in PATHS {
            let target = Target::new(self.topo(), mode, path);
            measure::probe(&target)
                .with_context(|| format!("{} on the {} path", mode.name(), path.name()))?;
            let key = |metric| (mode, path, others, metric);
            let mut line = format!(
                "[{}/{}] {:<12} {:<8} {:>5} other{}:",
                rep + 1,
                plan.reps,
                mode.name(),
                path.name(),
                others,
                if others == 1 { " " } else { "s" }
            );
            if full {
                interrupted()?;
                let gbps = measure::iperf3(&target, &self.load)?;
                self.record(key(Metric::TcpGbps), gbps);
                line += &format!(" tcp {gbps:.1} Gbit/s,");
            }
            let mut syn = 0;
            let mut errors = 0;
            for close in [false, true] {
                interrupted()?;
                let w = measure::wrk(&target, &self.load, close)?;
                let metrics = if close {
                    [Metric::ConnPerS, Metric::ConnP50Ms, Metric::ConnP99Ms]
                } else {
                    [Metric::KaRps, Metric::KaP50Ms, Metric::KaP99Ms]
                };
                self.record(key(metrics[0]), w.rps);
                self.record(key(metrics[1]), w.p50_ms);
                self.record(key(metrics[2]), w.p99_ms);
                syn += w.syn_retrans;
                errors += w.errors;
                line += &format!(
                    " {} {:.0}/s p99 {:.2} ms,",
                    if close { "conn" } else { "ka" },
                    w.rps,
                    w.p99_ms
                );
            }
            if full {
                interrupted()?;
                let rate = measure::udp_rr(&self.xtask, &target, &self.load, 32)?;
                self.record(key(Metric::UdpRps), rate);
                line += &format!(" udp {rate:.0}/s,");
                interrupted()?;
                let large = measure::UDP_LARGE;
                let rate = measure::udp_rr(&self.xtask, &target, &self.load, large)?;
                self.record(key(Metric::Udp4kRps), rate);
                line += &format!(" udp 4 KB {rate:.0}/s,");
            }
            self.results
                .syn_retrans
                .entry((mode, path, others))
                .or_default()
                .push(syn);
            *self.results.errors.entry((mode, path, others)).or_default() += errors;
            println!("{line} SYN rtx {syn}, errors {errors}");
        }
        Ok(())
    }

    /// Control-plane timings: 10,000 mappings at once, then one added and
    /// removed while they exist (each a fresh CLI process, as a runtime runs it).
    fn updates(&mut self, mode: Mode, plan: &Plan, work: &Path) -> Result<()> {
        let bulk_reps = plan.reps;
        let one_reps = if plan.quick { 3 } else { 10 };
        let ctr = self.topo().ctr_ip();
        let host = self.topo().host.clone();
        for rep in 0..bulk_reps {
            let active = self.env.setup(mode, 0)?;
            let result = (|| -> Result<()> {
                let install = match mode {
                    Mode::Iptables => {
                        let file = work.join("iptables-10k.rules");
                        let rules =
                            format!("*nat\n{}COMMIT\n", modes::iptables_others(ctr, 0, SCALE));
                        std::fs::write(&file, rules)?;
                        modes::timed_with_input(
                            in_ns(&host, "iptables-restore").args(["-w", "--noflush"]),
                            &file,
                        )?
                    }
                    Mode::Nft => {
                        let file = work.join("nft-10k.nft");
                        let elements = modes::nft_others(ctr, 0, SCALE).join(",\n  ");
                        std::fs::write(
                            &file,
                            format!("add element ip pfbench hostports {{\n  {elements}\n}}\n"),
                        )?;
                        modes::timed(in_ns(&host, "nft").arg("-f").arg(&file))?
                    }
                    Mode::Portfwd => self.env.portfwd_others(SCALE)?,
                    Mode::Direct | Mode::DockerProxy => unreachable!("no scale for {mode:?}"),
                };
                let count = self.env.count(mode)?;
                if count < SCALE {
                    bail!(
                        "{} has {count} mappings after installing {SCALE}",
                        mode.name()
                    );
                }
                self.results
                    .updates
                    .entry((mode, Update::InstallAll))
                    .or_default()
                    .push(install);
                let mut line = format!(
                    "[{}/{}] {:<12} install {SCALE} at once: {install:.1} ms",
                    rep + 1,
                    bulk_reps,
                    mode.name()
                );
                if rep == 0 {
                    let dnat = format!("{ctr}:80");
                    let one = ONE.to_string();
                    let rule = [
                        "-w",
                        "-t",
                        "nat",
                        "CNI-HOSTPORT-DNAT",
                        "-p",
                        "tcp",
                        "--dport",
                        &one,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &dnat,
                    ];
                    let element = format!("{{ tcp . {ONE} : {ctr} . 80 }}");
                    let key = format!("{{ tcp . {ONE} }}");
                    let (mut adds, mut removes) = (Vec::new(), Vec::new());
                    for i in 0..one_reps {
                        interrupted()?;
                        let (add, remove): (Command, Command) = match mode {
                            Mode::Iptables => {
                                let mut add = in_ns(&host, "iptables");
                                add.args(&rule[..3]).arg("-A").args(&rule[3..]);
                                let mut remove = in_ns(&host, "iptables");
                                remove.args(&rule[..3]).arg("-D").args(&rule[3..]);
                                (add, remove)
                            }
                            Mode::Nft => {
                                let mut add = in_ns(&host, "nft");
                                add.args([
                                    "add",
                                    "element",
                                    "ip",
                                    "pfbench",
                                    "hostports",
                                    &element,
                                ]);
                                let mut remove = in_ns(&host, "nft");
                                remove.args([
                                    "delete",
                                    "element",
                                    "ip",
                                    "pfbench",
                                    "hostports",
                                    &key,
                                ]);
                                (add, remove)
                            }
                            _ => {
                                let mut add = self.env.portfwd();
                                add.args(["map", "--name", "one", &ctr.to_string()])
                                    .arg(format!("0.0.0.0:{ONE}:80"));
                                let mut remove = self.env.portfwd();
                                remove.args(["unmap", &format!("0.0.0.0:{ONE}")]);
                                (add, remove)
                            }
                        };
                        let (mut add, mut remove) = (add, remove);
                        adds.push(modes::timed(&mut add)?);
                        if i == 0 {
                            // The mapping just added forwards.
                            let mut t = Target::new(self.topo(), mode, NetPath::External);
                            t.port_override = Some(ONE);
                            measure::probe(&t).context("the mapping added while 10,000 exist")?;
                        }
                        removes.push(modes::timed(&mut remove)?);
                    }
                    line += &format!(
                        "; with {SCALE} installed: add one {:.2} ms, remove one {:.2} ms (median of {one_reps})",
                        report::median(&adds),
                        report::median(&removes)
                    );
                    self.results
                        .updates
                        .entry((mode, Update::AddOne))
                        .or_default()
                        .extend(adds);
                    self.results
                        .updates
                        .entry((mode, Update::RemoveOne))
                        .or_default()
                        .extend(removes);
                }
                println!("{line}");
                Ok(())
            })();
            self.env.teardown(active);
            result?;
        }
        Ok(())
    }

    /// Where portfwd's CPU time goes: run_time_ns of each of its programs
    /// (kernel.bpf_stats_enabled, on only for this step) over one wrk run of
    /// new connections per path.
    fn profile(&mut self) -> Result<()> {
        let before_up = prog_stats()?;
        let active = self.env.setup(Mode::Portfwd, 0)?;
        let result = (|| -> Result<()> {
            let ours: Vec<u64> = prog_stats()?
                .into_iter()
                .filter(|(id, (name, _, _))| !before_up.contains_key(id) && name.starts_with("pf_"))
                .map(|(id, _)| id)
                .collect();
            let old = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?;
            self.bpf_stats_restore = Some(old.trim().to_owned());
            std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")?;
            for path in PATHS {
                let target = Target::new(self.topo(), Mode::Portfwd, path);
                let before = prog_stats()?;
                let w = measure::wrk(&target, &self.load, true)?;
                let after = prog_stats()?;
                let requests = w.rps * self.load.secs as f64;
                for id in &ours {
                    let (Some(a), Some(b)) = (after.get(id), before.get(id)) else {
                        continue;
                    };
                    let calls = a.2.saturating_sub(b.2);
                    if calls == 0 {
                        continue;
                    }
                    let ns = a.1.saturating_sub(b.1);
                    self.results.bpf.push(report::ProgCost {
                        path,
                        program: a.0.clone(),
                        calls_per_conn: calls as f64 / requests,
                        ns_per_call: ns as f64 / calls as f64,
                    });
                }
            }
            Ok(())
        })();
        if let Some(old) = self.bpf_stats_restore.take() {
            std::fs::write("/proc/sys/kernel/bpf_stats_enabled", old)?;
        }
        self.env.teardown(active);
        result
    }
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
    let bin = dir.join("docker.io/usr/sbin/docker-proxy");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(dir)?;
    println!("bench: extracting docker-proxy from Debian's docker.io package");
    let download = || {
        Command::new("apt-get")
            .current_dir(dir)
            .args(["-o", "DPkg::Lock::Timeout=600", "download", "docker.io"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
        if !download() {
            bail!("`apt-get download docker.io` failed");
        }
    }
    let deb = newest_deb(dir)?;
    run(Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("docker.io")))?;
    if !bin.is_file() {
        bail!("{} has no usr/sbin/docker-proxy", deb.display());
    }
    Ok(bin)
}

fn newest_deb(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("docker.io_"))
        })
        .max()
        .context("apt-get download left no docker.io_*.deb")
}

fn docker_proxy_version(dir: &Path) -> Option<String> {
    let deb = newest_deb(dir).ok()?;
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
