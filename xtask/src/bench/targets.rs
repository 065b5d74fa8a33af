//! The targets for the benchmark, checked against the medians.

use serde::Serialize;

use super::measure::{METRICS, Metric, NetPath, PATHS};
use super::modes::Mode;
use super::report::{median, min_max, ratio, value};
use super::{Results, SCALE, Update};

#[derive(Serialize)]
pub(crate) struct Check {
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) met: Option<bool>,
}

/// The targets, from the medians.
pub(crate) fn targets(r: &Results) -> Vec<Check> {
    let mut out = Vec::new();
    let pf = Mode::Portfwd;
    if r.main(pf, NetPath::Local, Metric::KaRps).is_none() {
        return out;
    }
    // portfwd / other ≥ bound (for latencies: other / portfwd, so that ≥ still means better).
    let mut vs = |what: String, path: NetPath, other: Mode, metric: Metric, bound: f64| {
        let a = r.main(pf, path, metric);
        let b = r.main(other, path, metric);
        let (measured, met) = match (a, b) {
            (Some(a), Some(b)) => {
                let x = a / b;
                let met = if metric.higher_is_better() {
                    x >= bound
                } else {
                    x <= 1.0 / bound
                };
                (
                    format!("{} vs {}: {}", value(metric, a), value(metric, b), ratio(x)),
                    Some(met),
                )
            }
            _ => (format!("{} not measured", other.name()), None),
        };
        out.push(Check {
            what,
            measured,
            met,
        });
    };
    let ext = NetPath::External;
    let local = NetPath::Local;
    vs(
        "external: throughput ≥ iptables".into(),
        ext,
        Mode::Iptables,
        Metric::TcpGbps,
        1.0,
    );
    vs(
        "external: throughput ≥ 0.95 × direct".into(),
        ext,
        Mode::Direct,
        Metric::TcpGbps,
        0.95,
    );
    vs(
        "external: new conn/s ≥ iptables".into(),
        ext,
        Mode::Iptables,
        Metric::ConnPerS,
        1.0,
    );
    for metric in METRICS {
        let what = if metric.higher_is_better() {
            format!("local: {} ≥ 0.95 × direct", metric.label())
        } else {
            format!("local: {} ≤ direct / 0.95", metric.label())
        };
        vs(what, local, Mode::Direct, metric, 0.95);
    }
    vs(
        "local: keep-alive req/s ≥ 1.5 × docker-proxy".into(),
        local,
        Mode::DockerProxy,
        Metric::KaRps,
        1.5,
    );
    vs(
        "local: new conn/s ≥ 1.5 × docker-proxy".into(),
        local,
        Mode::DockerProxy,
        Metric::ConnPerS,
        1.5,
    );
    vs(
        "local: keep-alive p99 ≤ 0.6 × docker-proxy".into(),
        local,
        Mode::DockerProxy,
        Metric::KaP99Ms,
        1.0 / 0.6,
    );
    for path in PATHS {
        for metric in [
            Metric::ConnPerS,
            Metric::ConnP50Ms,
            Metric::ConnP99Ms,
            Metric::KaP99Ms,
        ] {
            let base = r.med(pf, path, 1, metric);
            let at = r.med(pf, path, SCALE, metric);
            let (measured, met) = match (base, at) {
                (Some(b), Some(a)) => {
                    let change = a / b - 1.0;
                    let worse = if metric.higher_is_better() {
                        -change
                    } else {
                        change
                    };
                    (
                        format!(
                            "{} at {SCALE} vs {} at 1: {:+.1}%",
                            value(metric, a),
                            value(metric, b),
                            change * 100.0
                        ),
                        Some(worse <= 0.03),
                    )
                }
                _ => ("not measured".into(), None),
            };
            out.push(Check {
                what: format!(
                    "{}: {} at {SCALE} mappings within 3 % of 1 mapping",
                    path.name(),
                    metric.label()
                ),
                measured,
                met,
            });
        }
    }
    for (update, what, bound) in [
        (
            Update::AddOne,
            format!("add one mapping with {SCALE} installed < 10 ms"),
            10.0,
        ),
        (
            Update::InstallAll,
            format!("install {SCALE} at once < 1 s"),
            1000.0,
        ),
    ] {
        let (measured, met) = match r.updates.get(&(pf, update)) {
            Some(v) if !v.is_empty() => {
                let (_, max) = min_max(v);
                (
                    format!("median {:.2} ms, max {max:.2} ms", median(v)),
                    Some(median(v) < bound),
                )
            }
            _ => ("not measured".into(), None),
        };
        out.push(Check {
            what,
            measured,
            met,
        });
    }
    out
}
