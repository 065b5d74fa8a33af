//! `cargo xtask bench --rootless`: a port of an unprivileged user's own
//! network namespace, published by RootlessKit's `builtin` port driver (a
//! process that copies every byte), by portfwd's rootless path (`portfwd
//! serve` under a policy, the user's `portfwd map --netns PID`) and by
//! pasta, into the same namespace, to the same servers, on the same host
//! ports, in turns.
//!
//! ```text
//! <p>-cli --veth-- h2e (10.N.2.1) <p>-host: rootlesskit (builtin driver), portfwd serve, pasta
//!                                     |  slirp4netns: tap0 (the namespace's own network)
//!                                     |  pfr0 --veth-- portfwd0 (portfwd's way in)
//!                                     |  pasta: pasta0 (while pasta publishes)
//!                                  the user's namespace (RootlessKit's child): nginx, iperf3
//! ```
//!
//! The user is a system user the bench creates (with a subordinate id range,
//! which RootlessKit needs) and deletes; its files live in a directory of
//! its own under /tmp, deleted too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::json;

use super::measure::{self, Load, Metric, NetPath, PATHS, Target};
use super::modes::{HTTP, IPERF, Mode, Port};
use super::ns::{self, H2E, Role, Topo, check, in_ns, in_ns_as};
use super::report::{self, median, ratio, value};
use super::{NGINX_CONF, Plan, loadavg};
use crate::interrupt;

mod output;
mod rig;

use output::{markdown, to_json};
use rig::Rig;

/// What publishes the namespace's ports on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Driver {
    /// RootlessKit 1.1's `builtin` port driver (`rootlessctl add-ports`).
    Rootlesskit,
    /// portfwd's rootless path: the user's `portfwd map --netns PID`.
    Portfwd,
    /// pasta (Debian's passt 2023-03), joined to the same namespace: a
    /// userspace copy too (splice for local clients, its own TCP/IP
    /// translation through a tap device for external ones).
    Pasta,
}

const DRIVERS: [Driver; 3] = [Driver::Rootlesskit, Driver::Portfwd, Driver::Pasta];

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Rootlesskit => "rootlesskit builtin",
            Driver::Portfwd => "portfwd rootless",
            Driver::Pasta => "pasta",
        }
    }
}

/// The published ports: HTTP (nginx) and iperf3, as in the rootful modes.
const PUBLISHED: [Port; 2] = [HTTP, IPERF];

/// The figures of this comparison (UDP is left out: the issue asks for
/// throughput, request rate and connection rate).
const METRICS: [Metric; 6] = [
    Metric::TcpGbps,
    Metric::KaRps,
    Metric::KaP50Ms,
    Metric::KaP99Ms,
    Metric::ConnPerS,
    Metric::ConnP99Ms,
];

/// A subordinate uid/gid range for the bench's user (RootlessKit maps it
/// into the namespace); far from the usual 100000+ allocations.
const SUBIDS: &str = "493216-558751";

/// The way in's addresses, inside the bench's own host namespace.
const POOL_V4: &str = "198.19.251.0/24";
const POOL_V6: &str = "fd70:6f72:7466:7764::fb00/120";

#[derive(Default)]
pub(crate) struct RootlessResults {
    samples: BTreeMap<(Driver, NetPath, Metric), Vec<f64>>,
    syn_retrans: BTreeMap<(Driver, NetPath), Vec<u64>>,
    errors: BTreeMap<(Driver, NetPath), u64>,
    load: Vec<f64>,
}

pub(crate) fn bench(
    plan: &Plan,
    prefix: &str,
    topo: &Topo,
    portfwd: PathBuf,
    out: &Path,
) -> Result<()> {
    let started = Instant::now();
    let mut rig = Rig::new(topo, portfwd, prefix);
    rig.cleanup();
    let mut results = RootlessResults::default();
    let result = rig.run(plan, &mut results);
    drop(rig);
    interrupt::check()?;
    result?;

    let markdown = markdown(plan, &results, started.elapsed().as_secs_f64());
    println!("\n{markdown}");
    std::fs::write(out.join("rootless.md"), &markdown)?;
    std::fs::write(
        out.join("rootless.json"),
        serde_json::to_string_pretty(&to_json(plan, &results))? + "\n",
    )?;
    println!(
        "results: {}, {}",
        out.join("rootless.md").display(),
        out.join("rootless.json").display()
    );
    Ok(())
}

/// One driver's figures on both paths (the clients dial the host's ports
/// as in the rootful modes: the uplink address from the client namespace,
/// 127.0.0.1 from the host namespace).
fn measure_driver(
    topo: &Topo,
    driver: Driver,
    rep: usize,
    plan: &Plan,
    load: &Load,
    results: &mut RootlessResults,
) -> Result<()> {
    for path in PATHS {
        // Mode::Portfwd: a client of the host's published ports.
        let target = Target::new(topo, Mode::Portfwd, path);
        measure::probe(&target)
            .with_context(|| format!("{} on the {} path", driver.name(), path.name()))?;
        let mut record = |metric, v| {
            results
                .samples
                .entry((driver, path, metric))
                .or_default()
                .push(v);
        };
        interrupt::check()?;
        let gbps = measure::iperf3(&target, load)?;
        record(Metric::TcpGbps, gbps);
        let mut line = format!(
            "[{}/{}] {:<19} {:<8} tcp {gbps:.1} Gbit/s,",
            rep + 1,
            plan.reps,
            driver.name(),
            path.name()
        );
        let (mut syn, mut errors) = (0, 0);
        for close in [false, true] {
            interrupt::check()?;
            let w = measure::wrk(&target, load, close)?;
            let metrics = if close {
                [Metric::ConnPerS, Metric::ConnP50Ms, Metric::ConnP99Ms]
            } else {
                [Metric::KaRps, Metric::KaP50Ms, Metric::KaP99Ms]
            };
            record(metrics[0], w.rps);
            record(metrics[1], w.p50_ms);
            record(metrics[2], w.p99_ms);
            syn += w.syn_retrans;
            errors += w.errors;
            write!(
                line,
                " {} {:.0}/s p99 {:.2} ms,",
                if close { "conn" } else { "ka" },
                w.rps,
                w.p99_ms
            )
            .expect("writing to a String");
        }
        results
            .syn_retrans
            .entry((driver, path))
            .or_default()
            .push(syn);
        *results.errors.entry((driver, path)).or_default() += errors;
        println!("{line} SYN rtx {syn}, errors {errors}");
    }
    Ok(())
}

impl RootlessResults {
    fn series(&self, driver: Driver, path: NetPath, metric: Metric) -> &[f64] {
        self.samples
            .get(&(driver, path, metric))
            .map_or(&[], Vec::as_slice)
    }

    fn med(&self, driver: Driver, path: NetPath, metric: Metric) -> Option<f64> {
        let s = self.series(driver, path, metric);
        (!s.is_empty()).then(|| median(s))
    }

    /// `a` / `b`, ratio of medians.
    fn ratio(&self, a: Driver, b: Driver, path: NetPath, metric: Metric) -> Option<f64> {
        Some(self.med(a, path, metric)? / self.med(b, path, metric)?)
    }
}
