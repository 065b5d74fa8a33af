//! Control-plane timings: 10,000 mappings at once, then one added and
//! removed while they exist (each a fresh CLI process, as a runtime runs it).

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use super::{
    Plan, SCALE, Update,
    measure::{self, NetPath, Target},
    modes::{self, Mode, ONE},
    ns::in_ns,
    report,
    runner::Bench,
};
use crate::interrupt;

impl Bench<'_> {
    pub(super) fn updates(&mut self, mode: Mode, plan: &Plan, work: &Path) -> Result<()> {
        for rep in 0..plan.reps {
            let active = self.env.setup(mode, 0)?;
            let result = self.update_rep(mode, plan, work, rep);
            self.env.teardown(active);
            result?;
        }
        Ok(())
    }

    /// One repetition: install them all; on the first, add and remove one.
    fn update_rep(&mut self, mode: Mode, plan: &Plan, work: &Path, rep: usize) -> Result<()> {
        let install = self.install_all(mode, work)?;
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
            plan.reps,
            mode.name()
        );
        if rep == 0 {
            let one_reps = if plan.quick { 3 } else { 10 };
            let (adds, removes) = self.add_and_remove_one(mode, one_reps)?;
            line += &format!(
                "; with {SCALE} installed: add one {:.2} ms, remove one {:.2} ms (median of {one_reps})",
                report::median(&adds),
                report::median(&removes)
            );
            let updates = &mut self.results.updates;
            updates
                .entry((mode, Update::AddOne))
                .or_default()
                .extend(adds);
            updates
                .entry((mode, Update::RemoveOne))
                .or_default()
                .extend(removes);
        }
        println!("{line}");
        Ok(())
    }

    /// Installs SCALE mappings in one go; the milliseconds it took.
    fn install_all(&mut self, mode: Mode, work: &Path) -> Result<f64> {
        let ctr = self.topo().ctr_ip();
        let host = self.topo().host.clone();
        match mode {
            Mode::Iptables => {
                let file = work.join("iptables-10k.rules");
                let rules = format!("*nat\n{}COMMIT\n", modes::iptables_others(ctr, 0, SCALE));
                std::fs::write(&file, rules)?;
                modes::timed_with_input(
                    in_ns(&host, "iptables-restore").args(["-w", "--noflush"]),
                    &file,
                )
            }
            Mode::Nft => {
                let file = work.join("nft-10k.nft");
                let elements = modes::nft_others(ctr, 0, SCALE).join(",\n  ");
                std::fs::write(
                    &file,
                    format!("add element ip pfbench hostports {{\n  {elements}\n}}\n"),
                )?;
                modes::timed(in_ns(&host, "nft").arg("-f").arg(&file))
            }
            Mode::Portfwd => self.env.portfwd_others(SCALE),
            Mode::Direct | Mode::DockerProxy => unreachable!("no scale for {mode:?}"),
        }
    }

    /// Adds and removes one mapping `reps` times while SCALE exist; the
    /// milliseconds of each add and each remove.
    fn add_and_remove_one(&mut self, mode: Mode, reps: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let (mut adds, mut removes) = (Vec::new(), Vec::new());
        for i in 0..reps {
            interrupt::check()?;
            let (mut add, mut remove) = self.one_commands(mode);
            adds.push(modes::timed(&mut add)?);
            if i == 0 {
                // The mapping just added forwards.
                let mut t = Target::new(self.topo(), mode, NetPath::External);
                t.port_override = Some(ONE);
                measure::probe(&t).context("the mapping added while 10,000 exist")?;
            }
            removes.push(modes::timed(&mut remove)?);
        }
        Ok((adds, removes))
    }

    /// The commands that add and remove the one mapping (port ONE).
    fn one_commands(&self, mode: Mode) -> (Command, Command) {
        let ctr: Ipv4Addr = self.topo().ctr_ip();
        let host = &self.topo().host;
        match mode {
            Mode::Iptables => {
                let dnat = format!("{ctr}:80");
                let one = ONE.to_string();
                let rule = [
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
                let command = |op: &str| {
                    let mut cmd = in_ns(host, "iptables");
                    cmd.args(["-w", "-t", "nat", op]).args(rule);
                    cmd
                };
                (command("-A"), command("-D"))
            }
            Mode::Nft => {
                let element = format!("{{ tcp . {ONE} : {ctr} . 80 }}");
                let key = format!("{{ tcp . {ONE} }}");
                let command = |op: &str, what: &str| {
                    let mut cmd = in_ns(host, "nft");
                    cmd.args([op, "element", "ip", "pfbench", "hostports", what]);
                    cmd
                };
                (command("add", &element), command("delete", &key))
            }
            _ => {
                let mut add = self.env.portfwd();
                add.args(["map", "--name", "one", &ctr.to_string()])
                    .arg(format!("0.0.0.0:{ONE}:80"));
                let mut remove = self.env.portfwd();
                remove.args(["unmap", &format!("0.0.0.0:{ONE}")]);
                (add, remove)
            }
        }
    }
}
