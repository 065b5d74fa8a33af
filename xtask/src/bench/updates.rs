//! Control-plane timings: 10,000 mappings at once, then one added and
//! removed while they exist (each a fresh CLI process, as a runtime runs it),
//! 10,000 automatic ports, a request that cannot be met, `apply -f` changing
//! one of 10,000, and the scale curve: add one / remove one with 1 to 50,000
//! installed.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use super::{
    CURVE, Plan, SCALE, Update,
    measure::{self, NetPath, Target},
    modes::{self, Mode, ONE, PORTS},
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
            for (update, ms) in self.more_updates(mode, work)? {
                line += &format!("; {update:?} {ms:.1} ms");
                self.results
                    .updates
                    .entry((mode, update))
                    .or_default()
                    .push(ms);
            }
        }
        println!("{line}");
        Ok(())
    }

    /// With SCALE installed: automatic ports, an impossible request and
    /// `apply -f` changing one mapping, where the mode has them.
    fn more_updates(&mut self, mode: Mode, work: &Path) -> Result<Vec<(Update, f64)>> {
        let ctr = self.topo().ctr_ip().to_string();
        let host = self.topo().host.clone();
        let mut out = Vec::new();
        match mode {
            Mode::Portfwd => {
                let mut auto = self.env.portfwd();
                // IPv4 only, like every mapping of the bench: 10,000 mappings.
                auto.args(["map", "--name", "auto", &ctr, "0.0.0.0::1-10000/udp"]);
                out.push((Update::AutoPorts, modes::timed(&mut auto)?));
                super::ns::check(self.env.portfwd().args(["unmap", "--name", "auto"]))?;
                let mut impossible = self.env.portfwd();
                impossible.args(["map", "--name", "toomany", &ctr, "49153-61000"]);
                out.push((Update::Impossible, timed_failure(&mut impossible)?));
                let file = work.join("apply-one.toml");
                let bench: Vec<String> = PORTS
                    .iter()
                    .map(|&p| format!("{:?}", modes::publish(p)))
                    .collect();
                let last = modes::OTHERS as usize + SCALE - 1;
                let text = format!(
                    "[[mappings]]\nname = \"bench\"\ncontainer = \"{ctr}\"\npublish = [{}]\n\n\
                     [[mappings]]\nname = \"others\"\ncontainer = \"{ctr}\"\n\
                     publish = [\"0.0.0.0:{first}-{before}:{first}-{before}\", \"0.0.0.0:{last}:80\"]\n",
                    bench.join(", "),
                    first = modes::OTHERS,
                    before = last - 1,
                );
                std::fs::write(&file, text)?;
                let mut apply = self.env.portfwd();
                apply.args(["apply", "-f"]).arg(&file);
                out.push((Update::ApplyOne, modes::timed(&mut apply)?));
            }
            Mode::Nft => {
                // The whole set replaced in one transaction, one element changed.
                let file = work.join("nft-apply-one.nft");
                let mut elements: Vec<String> = PORTS
                    .iter()
                    .map(|p| {
                        let proto = if p.udp { "udp" } else { "tcp" };
                        format!("{proto} . {} : {ctr} . {}", p.host, p.ctr)
                    })
                    .collect();
                let ctr_ip = self.topo().ctr_ip();
                elements.extend(modes::nft_others(ctr_ip, 0, SCALE - 1));
                let last = modes::OTHERS as usize + SCALE - 1;
                elements.push(format!("tcp . {last} : {ctr} . 80"));
                let mut text = String::from("flush map ip pfbench hostports\n");
                writeln!(
                    text,
                    "add element ip pfbench hostports {{\n  {}\n}}",
                    elements.join(",\n  ")
                )?;
                std::fs::write(&file, text)?;
                out.push((
                    Update::ApplyOne,
                    modes::timed(in_ns(&host, "nft").arg("-f").arg(&file))?,
                ));
            }
            _ => {}
        }
        Ok(out)
    }

    /// The scale curve: add one and remove one with 1 to 50,000 installed.
    pub(super) fn curve(&mut self, mode: Mode, plan: &Plan, work: &Path) -> Result<()> {
        let reps = if plan.quick { 3 } else { 5 };
        for &installed in &CURVE {
            interrupt::check()?;
            let active = self.env.setup(mode, 0)?;
            let result = self
                .install_curve(mode, installed, work)
                .and_then(|()| self.add_and_remove_one(mode, reps));
            self.env.teardown(active);
            let (adds, removes) = result?;
            println!(
                "{:<12} with {installed} installed: add one {:.2} ms, remove one {:.2} ms (median of {reps})",
                mode.name(),
                report::median(&adds),
                report::median(&removes)
            );
            let updates = &mut self.results.updates;
            updates
                .entry((mode, Update::AddOneAt(installed)))
                .or_default()
                .extend(adds);
            updates
                .entry((mode, Update::RemoveOneAt(installed)))
                .or_default()
                .extend(removes);
        }
        Ok(())
    }

    /// Installs `count` mappings for the curve: TCP ports from CURVE_BASE,
    /// then UDP ones (50,000 do not fit one protocol's ports).
    fn install_curve(&mut self, mode: Mode, count: usize, work: &Path) -> Result<()> {
        const CURVE_BASE: usize = 10_000;
        const PER_PROTOCOL: usize = 25_000;
        let ctr = self.topo().ctr_ip();
        let tcp = count.min(PER_PROTOCOL);
        let parts = [("tcp", tcp), ("udp", count - tcp)];
        match mode {
            Mode::Nft => {
                let mut elements = Vec::new();
                for (proto, n) in parts {
                    for port in CURVE_BASE..CURVE_BASE + n {
                        elements.push(format!("{proto} . {port} : {ctr} . {port}"));
                    }
                }
                let file = work.join("nft-curve.nft");
                std::fs::write(
                    &file,
                    format!(
                        "add element ip pfbench hostports {{\n  {}\n}}\n",
                        elements.join(",\n  ")
                    ),
                )?;
                let host = self.topo().host.clone();
                modes::timed(in_ns(&host, "nft").arg("-f").arg(&file))?;
            }
            Mode::Portfwd => {
                let mut map = self.env.portfwd();
                map.args(["map", "--name", "curve", &ctr.to_string()]);
                for (proto, n) in parts.into_iter().filter(|&(_, n)| n > 0) {
                    let last = CURVE_BASE + n - 1;
                    map.arg(format!(
                        "0.0.0.0:{CURVE_BASE}-{last}:{CURVE_BASE}-{last}/{proto}"
                    ));
                }
                modes::timed(&mut map)?;
            }
            _ => bail!("no scale curve for {}", mode.name()),
        }
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

/// Runs a command that must fail; the milliseconds it took to.
fn timed_failure(cmd: &mut Command) -> Result<f64> {
    let start = Instant::now();
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", crate::display(cmd)))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if out.status.success() {
        bail!("`{}` succeeded, but it must fail", crate::display(cmd));
    }
    Ok(ms)
}
