//! One benchmark run: the topology, the servers, every trial of every
//! mode, and the profile of portfwd's programs.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};

use super::{
    Key, NGINX_CONF, Plan, Results, Trial, loadavg,
    measure::{self, Load, Metric, PATHS, Target, Traffic},
    modes::{Env, Mode},
    ns::{self, Role, Topo, in_ns_as},
    prog_stats, report,
};
use crate::interrupt;

/// Where the kernel's per-program run time and count are switched on.
const BPF_STATS_KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Owns everything the run creates; Drop removes it on success, error or Ctrl-C.
pub(super) struct Bench<'a> {
    pub(super) env: Env<'a>,
    pub(super) xtask: PathBuf,
    pub(super) servers: Vec<Child>,
    pub(super) results: Results,
    pub(super) load: Load,
    /// kernel.bpf_stats_enabled as it was, while we have set it.
    pub(super) bpf_stats_restore: Option<String>,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

impl Bench<'_> {
    pub(super) fn topo(&self) -> &Topo {
        self.env.topo
    }

    /// Removes what this run (or an earlier one killed hard) left.
    pub(super) fn cleanup(&mut self) {
        if let Some(old) = self.bpf_stats_restore.take() {
            std::fs::write(BPF_STATS_KNOB, old).ok();
        }
        for server in &mut self.servers {
            server.kill().ok();
            server.wait().ok();
        }
        self.servers.clear();
        if self.env.bpffs.exists() {
            Command::new(&self.env.portfwd)
                .arg("--bpffs")
                .arg(&self.env.bpffs)
                .arg("down")
                .stdout(Stdio::null())
                .status()
                .ok();
        }
        self.topo().destroy();
    }

    pub(super) fn run(&mut self, plan: &Plan, work: &Path) -> Result<()> {
        println!(
            "==> topology: namespaces {}, {}, {} on 10.{}.0.0/16",
            self.topo().host,
            self.topo().ctr,
            self.topo().cli,
            self.topo().net
        );
        self.topo().create()?;
        self.start_servers(work)?;
        // Off while measuring: on, it adds two clock reads to each program
        // run (about nine per new local connection), which is portfwd's
        // cost only while someone profiles it. `profile` turns it on for
        // its own step.
        self.set_bpf_stats("0")?;

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
        if plan.control_plane {
            trials.clear();
        }
        for rep in (0..plan.reps).filter(|_| !trials.is_empty()) {
            for trial in repetition_order(&trials, rep) {
                interrupt::check()?;
                self.trial(trial, rep, plan)?;
            }
        }
        // A focused run (--paths, --loads) measures its figures alone.
        if plan.focused {
            return Ok(());
        }
        for &mode in plan.modes.iter().filter(|m| m.scales()) {
            interrupt::check()?;
            self.updates(mode, plan, work)?;
        }
        if !plan.quick {
            for &mode in plan.modes.iter().filter(|m| m.curves()) {
                interrupt::check()?;
                self.curve(mode, plan, work)?;
            }
        }
        if !plan.quick && !plan.control_plane && plan.modes.contains(&Mode::Portfwd) {
            interrupt::check()?;
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
            in_ns_as(&ctr, "nginx", Role::Server)
                .arg("-p")
                .arg(&nginx_dir)
                .arg("-c")
                .arg(&conf)
                .args(["-e", "stderr"]),
        )?;
        self.servers.push(nginx);
        let iperf = spawn(in_ns_as(&ctr, "iperf3", Role::Server).args(["-s", "-p", "5201"]))?;
        self.servers.push(iperf);
        let echo = spawn(
            in_ns_as(&ctr, &self.xtask, Role::Server)
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
        let load = |traffic| plan.loads.contains(&traffic);
        for &path in &plan.paths {
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
            if full && load(Traffic::Tcp) {
                interrupt::check()?;
                let gbps = measure::iperf3(&target, &self.load)?;
                self.record(key(Metric::TcpGbps), gbps);
                line += &format!(" tcp {gbps:.1} Gbit/s,");
            }
            let mut syn = 0;
            let mut errors = 0;
            let wrk_runs = [(false, Traffic::KeepAlive), (true, Traffic::NewConnections)];
            for (close, _) in wrk_runs.into_iter().filter(|&(_, traffic)| load(traffic)) {
                interrupt::check()?;
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
            if full && load(Traffic::Udp) {
                interrupt::check()?;
                let rate = measure::udp_rr(&self.xtask, &target, &self.load, 32)?;
                self.record(key(Metric::UdpRps), rate);
                line += &format!(" udp {rate:.0}/s,");
            }
            if full && load(Traffic::Udp4k) {
                interrupt::check()?;
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

    /// Where portfwd's CPU time goes: run_time_ns of each of its programs
    /// (kernel.bpf_stats_enabled, on only for this step) over one wrk run of
    /// new connections per path.
    fn profile(&mut self) -> Result<()> {
        let before_up = prog_stats()?;
        let active = self.env.setup(Mode::Portfwd, 0)?;
        let result = (|| -> Result<()> {
            // Loaded by this `up`, and one of portfwd's programs by name.
            let ours: BTreeMap<u64, &str> = prog_stats()?
                .into_iter()
                .filter(|(id, _)| !before_up.contains_key(id))
                .filter_map(|(id, (name, _, _))| Some((id, program_named(&name)?)))
                .collect();
            self.set_bpf_stats("1")?;
            for path in PATHS {
                let target = Target::new(self.topo(), Mode::Portfwd, path);
                let before = prog_stats()?;
                let w = measure::wrk(&target, &self.load, true)?;
                let after = prog_stats()?;
                let requests = w.rps * self.load.secs as f64;
                for (id, &program) in &ours {
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
                        program: program.to_owned(),
                        calls_per_conn: calls as f64 / requests,
                        ns_per_call: ns as f64 / calls as f64,
                    });
                }
            }
            Ok(())
        })();
        self.set_bpf_stats("0")?;
        self.env.teardown(active);
        result
    }

    /// Sets kernel.bpf_stats_enabled, keeping what it was for `cleanup` the
    /// first time.
    fn set_bpf_stats(&mut self, value: &str) -> Result<()> {
        if self.bpf_stats_restore.is_none() {
            let old = std::fs::read_to_string(BPF_STATS_KNOB)?;
            self.bpf_stats_restore = Some(old.trim().to_owned());
        }
        std::fs::write(BPF_STATS_KNOB, value)?;
        Ok(())
    }
}

/// The portfwd program that the kernel lists as `kernel_name`: the kernel
/// keeps 15 bytes of a name, and the loader may drop the `pf_` prefix
/// (`pf_tc_uplink_in` is listed as `tc_uplink_in`), so a listed name is the
/// tail of the full one, or its start when truncated.
fn program_named(kernel_name: &str) -> Option<&'static str> {
    portfwd_common::programs()
        .map(|p| p.name)
        .find(|full| {
            full.ends_with(kernel_name)
                || (kernel_name.len() == 15 && full.starts_with(kernel_name))
        })
        .filter(|_| kernel_name.len() >= 8)
}

/// The trials of repetition `rep`, interleaved: every configuration once,
/// in an order that alternates direction and shifts, so that no mode
/// always runs first, last or after the same one; except that portfwd's
/// main trial runs right after `direct`'s in even repetitions and right
/// before it in odd ones: the two are compared repetition by repetition
/// (`Results::per_repetition`), and slow drift on the machine then moves
/// both alike.
fn repetition_order(trials: &[Trial], rep: usize) -> Vec<&Trial> {
    let mut order: Vec<&Trial> = trials.iter().collect();
    if rep % 2 == 1 {
        order.reverse();
    }
    let len = order.len();
    order.rotate_left((rep / 2) % len);
    let main = |mode: Mode| move |trial: &&Trial| trial.mode == mode && trial.full;
    if let Some(ours) = order.iter().position(main(Mode::Portfwd)) {
        let ours = order.remove(ours);
        let direct = order.iter().position(main(Mode::Direct));
        let at = direct.map_or(order.len(), |d| d + usize::from(rep.is_multiple_of(2)));
        order.insert(at, ours);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::{Mode, Trial, program_named, repetition_order};

    #[test]
    fn portfwd_runs_beside_direct_in_every_repetition() {
        let mut trials: Vec<Trial> = [
            Mode::Direct,
            Mode::Iptables,
            Mode::Nft,
            Mode::DockerProxy,
            Mode::Portfwd,
        ]
        .into_iter()
        .map(|mode| Trial {
            mode,
            others: usize::from(mode.scales()),
            full: true,
        })
        .collect();
        for others in [1000, 10_000] {
            for mode in [Mode::Iptables, Mode::Nft, Mode::Portfwd] {
                trials.push(Trial {
                    mode,
                    others,
                    full: false,
                });
            }
        }
        let mut firsts = Vec::new();
        for rep in 0..6 {
            let order = repetition_order(&trials, rep);
            assert_eq!(
                order.len(),
                trials.len(),
                "repetition {rep}: every trial once"
            );
            for trial in &trials {
                let times = order.iter().filter(|t| std::ptr::eq(**t, trial)).count();
                assert_eq!(times, 1, "repetition {rep}: {:?} once", trial.mode);
            }
            let at = |mode: Mode| order.iter().position(|t| t.mode == mode && t.full).unwrap();
            let (direct, ours) = (at(Mode::Direct), at(Mode::Portfwd));
            let expected = if rep % 2 == 0 { direct + 1 } else { direct - 1 };
            assert_eq!(ours, expected, "repetition {rep}: portfwd beside direct");
            firsts.push(order[0].mode);
        }
        // The order still moves: not the same mode first every time.
        firsts.dedup();
        assert!(firsts.len() > 1, "the same trial first in every repetition");
    }

    #[test]
    fn kernel_names_map_to_portfwd_programs() {
        assert_eq!(program_named("tc_uplink_in"), Some("pf_tc_uplink_in"));
        assert_eq!(program_named("getpeername4"), Some("pf_getpeername4"));
        assert_eq!(program_named("pf_connect4"), Some("pf_connect4"));
        assert_eq!(program_named("pf_tc_backend_i"), Some("pf_tc_backend_in"));
        assert_eq!(program_named("tc_backend_in"), Some("pf_tc_backend_in"));
        assert_eq!(program_named("cil_from_netdev"), None);
        assert_eq!(program_named("in"), None);
    }
}
