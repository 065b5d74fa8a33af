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
    if r.main(Mode::Portfwd, NetPath::Local, Metric::KaRps)
        .is_none()
    {
        return Vec::new();
    }
    let mut out = against_other_modes(r);
    out.extend(scale_checks(r));
    out.extend(update_checks(r));
    out
}

/// portfwd against direct, iptables and docker-proxy on the same path.
fn against_other_modes(r: &Results) -> Vec<Check> {
    let ext = NetPath::External;
    let local = NetPath::Local;
    let mut cases = vec![
        (
            "external: throughput ≥ iptables".to_owned(),
            ext,
            Mode::Iptables,
            Metric::TcpGbps,
            1.0,
        ),
        (
            "external: throughput ≥ 0.95 × direct".into(),
            ext,
            Mode::Direct,
            Metric::TcpGbps,
            0.95,
        ),
        (
            "external: new conn/s ≥ iptables".into(),
            ext,
            Mode::Iptables,
            Metric::ConnPerS,
            1.0,
        ),
    ];
    for metric in METRICS {
        let what = if metric.higher_is_better() {
            format!("local: {} ≥ 0.95 × direct", metric.label())
        } else {
            format!("local: {} ≤ direct / 0.95", metric.label())
        };
        cases.push((what, local, Mode::Direct, metric, 0.95));
    }
    cases.extend([
        (
            "local: keep-alive req/s ≥ 1.5 × docker-proxy".into(),
            local,
            Mode::DockerProxy,
            Metric::KaRps,
            1.5,
        ),
        (
            "local: new conn/s ≥ 1.5 × docker-proxy".into(),
            local,
            Mode::DockerProxy,
            Metric::ConnPerS,
            1.5,
        ),
        (
            "local: keep-alive p99 ≤ 0.6 × docker-proxy".into(),
            local,
            Mode::DockerProxy,
            Metric::KaP99Ms,
            1.0 / 0.6,
        ),
    ]);
    cases
        .into_iter()
        .map(|(what, path, other, metric, bound)| versus(r, what, path, other, metric, bound))
        .collect()
}

/// portfwd / other ≥ bound (for latencies: other / portfwd, so that ≥
/// still means better).
fn versus(
    r: &Results,
    what: String,
    path: NetPath,
    other: Mode,
    metric: Metric,
    bound: f64,
) -> Check {
    let a = r.main(Mode::Portfwd, path, metric);
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
    Check {
        what,
        measured,
        met,
    }
}

/// portfwd with SCALE mappings installed within 3 % of one mapping.
fn scale_checks(r: &Results) -> Vec<Check> {
    let mut out = Vec::new();
    for path in PATHS {
        for metric in [
            Metric::ConnPerS,
            Metric::ConnP50Ms,
            Metric::ConnP99Ms,
            Metric::KaP99Ms,
        ] {
            let base = r.med(Mode::Portfwd, path, 1, metric);
            let at = r.med(Mode::Portfwd, path, SCALE, metric);
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
    out
}

/// How long portfwd takes to add one mapping, and to install SCALE.
fn update_checks(r: &Results) -> Vec<Check> {
    let bounds = [
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
    ];
    bounds
        .into_iter()
        .map(|(update, what, bound)| {
            let (measured, met) = match r.updates.get(&(Mode::Portfwd, update)) {
                Some(v) if !v.is_empty() => {
                    let (_, max) = min_max(v);
                    (
                        format!("median {:.2} ms, max {max:.2} ms", median(v)),
                        Some(median(v) < bound),
                    )
                }
                _ => ("not measured".into(), None),
            };
            Check {
                what,
                measured,
                met,
            }
        })
        .collect()
}
