//! Prometheus metrics on `/metrics` (OpenMetrics text, which Prometheus
//! also accepts as its classic text format): read from the pinned maps at
//! each scrape, without the state lock, so a scrape never waits for and
//! never delays a portfwd command.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, anyhow};
use portfwd_common::{CONNTRACK, MappingCounters, Stat};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    datapath::{self, MapFill, PinnedMaps, ProgramRuns},
    holder,
    model::Mapping,
};

/// The HTTP server, bound before the service reports that it runs, so that
/// a busy address is an error of `portfwd serve` itself.
pub(super) fn bind(addr: std::net::SocketAddr) -> Result<tiny_http::Server> {
    tiny_http::Server::http(addr).map_err(|error| anyhow!("serving metrics on {addr}: {error}"))
}

/// Answers scrapes until the process ends: `/metrics`, and 404 otherwise.
pub(super) fn serve(server: &tiny_http::Server, pin_dir: &Path) {
    for request in server.incoming_requests() {
        let response = if request.url() == "/metrics" {
            let openmetrics = render(Snapshot::read(pin_dir));
            if accepts_openmetrics(&request) {
                tiny_http::Response::from_string(openmetrics).with_header(header(OPENMETRICS))
            } else {
                tiny_http::Response::from_string(to_classic(&openmetrics))
                    .with_header(header(CLASSIC))
            }
        } else {
            tiny_http::Response::from_string("portfwd: metrics are on /metrics\n")
                .with_status_code(404)
        };
        // A scraper that went away is its own problem.
        request.respond(response).ok();
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

fn header(content_type: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header")
}

/// Prometheus asks for OpenMetrics; curl, promtool and older scrapers get
/// the classic text format.
fn accepts_openmetrics(request: &tiny_http::Request) -> bool {
    request.headers().iter().any(|h| {
        h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
    })
}

/// The classic text format (0.0.4) of an OpenMetrics text: the two differ,
/// for what this service emits, only in that OpenMetrics names a counter
/// family without the `_total` of its samples and ends with `# EOF`.
fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines().filter(|line| *line != "# EOF") {
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|tag| Some((tag, line.strip_prefix(tag)?)));
        match described {
            Some((tag, rest)) => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{tag}{name}{total} {text}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Everything one scrape shows, read at once.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// The maps are pinned (portfwd is up).
    up: bool,
    holder_running: bool,
    mappings: Vec<(Mapping, MappingCounters)>,
    stats: Vec<(Stat, u64)>,
    fill: Vec<MapFill>,
    programs: BTreeMap<String, ProgramRuns>,
}

impl Snapshot {
    pub(super) fn read(pin_dir: &Path) -> Self {
        let Ok(maps) = PinnedMaps::open_unlocked(pin_dir) else {
            return Snapshot::default();
        };
        let mappings = maps
            .mappings()
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let counters = maps.counters(&m);
                (m, counters)
            })
            .collect();
        Snapshot {
            up: true,
            holder_running: holder::is_running(pin_dir),
            mappings,
            stats: maps.stats(),
            fill: datapath::map_fill(pin_dir).unwrap_or_default(),
            programs: datapath::program_runs(pin_dir),
        }
    }
}

/// The text a scrape returns.
pub(super) fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("portfwd");
    // The registry's collectors must own what they encode.
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

type Labels = Vec<(&'static str, String)>;

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn mapping_labels(mapping: &Mapping) -> Labels {
    vec![
        ("name", mapping.name.clone()),
        ("protocol", mapping.protocol.as_str().to_owned()),
        ("host", mapping.host.to_string()),
        ("container", mapping.container.to_string()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_owned()));
    labels
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = self;
        let e = &mut encoder;
        gauge(
            e,
            "up",
            "1 when portfwd is up (its maps are pinned)",
            [(vec![], i64::from(s.up))],
        )?;
        gauge(
            e,
            "port_holder_running",
            "1 when the port holder runs (published ports are reserved)",
            [(vec![], i64::from(s.holder_running))],
        )?;
        gauge(
            e,
            "mappings",
            "Published ports (map entries)",
            [(vec![], s.mappings.len() as i64)],
        )?;
        s.encode_mappings(e)?;
        s.encode_programs(e)?;
        s.encode_maps(e)
    }
}

impl Snapshot {
    /// Per mapping: packets, bytes (both ways) and new flows.
    fn encode_mappings(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let s = self;
        let per_direction = |pick: fn(&MappingCounters) -> (u64, u64)| {
            s.mappings.iter().flat_map(move |(m, c)| {
                let (to_container, to_client) = pick(c);
                [
                    (with(mapping_labels(m), "direction", "in"), to_container),
                    (with(mapping_labels(m), "direction", "out"), to_client),
                ]
            })
        };
        counter(
            e,
            "mapping_packets",
            "Packets forwarded by a mapping on the TC path (in: to the container)",
            per_direction(|c| (c.packets_in, c.packets_out)),
        )?;
        counter(
            e,
            "mapping_bytes",
            "Bytes forwarded by a mapping on the TC path (in: to the container)",
            per_direction(|c| (c.bytes_in, c.bytes_out)),
        )?;
        counter(
            e,
            "mapping_flows",
            "New flows of a mapping on the TC path",
            s.mappings
                .iter()
                .map(|(m, c)| (mapping_labels(m), c.connections)),
        )?;
        Ok(())
    }

    /// What the programs did (by stat) and what they cost.
    fn encode_programs(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let s = self;
        counter(
            e,
            "datapath_packets",
            "What the TC programs did with packets, by event (drops by reason included)",
            s.stats
                .iter()
                .map(|(stat, n)| (vec![("event", stat.name().to_owned())], *n)),
        )?;
        counter(
            e,
            "program_runs",
            "Runs of each program (counted while kernel.bpf_stats_enabled is 1)",
            s.programs
                .iter()
                .map(|(name, runs)| (vec![("program", name.clone())], runs.runs)),
        )?;
        counter(
            e,
            "program_run_seconds",
            "Time spent in each program (counted while kernel.bpf_stats_enabled is 1)",
            s.programs
                .iter()
                .map(|(name, runs)| (vec![("program", name.clone())], runs.run_time.as_secs_f64())),
        )?;
        Ok(())
    }

    /// Map fill levels, conntrack's among them.
    fn encode_maps(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let s = self;
        let fill = |pick: fn(&MapFill) -> u64| {
            s.fill
                .iter()
                .map(move |f| (vec![("map", f.name.to_owned())], pick(f) as i64))
        };
        gauge(e, "map_entries", "Entries in a map", fill(|f| f.entries))?;
        gauge(e, "map_capacity", "Capacity of a map", fill(|f| f.capacity))?;
        let conntrack = s.fill.iter().find(|f| f.name == CONNTRACK.name);
        gauge(
            e,
            "conntrack_entries",
            "Tracked flow entries of the TC path (two per flow)",
            conntrack.map(|f| (vec![], f.entries as i64)),
        )?;
        gauge(
            e,
            "conntrack_capacity",
            "Capacity of the TC path's connection tracking, in entries",
            conntrack.map(|f| (vec![], f.capacity as i64)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counter_families_with_their_suffix() {
        let openmetrics = "# HELP x_flows New flows\n# TYPE x_flows counter\n\
            x_flows_total{name=\"web\"} 3\n# HELP x_up Up\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            to_classic(openmetrics),
            "# HELP x_flows_total New flows\n# TYPE x_flows_total counter\n\
             x_flows_total{name=\"web\"} 3\n# HELP x_up Up\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn a_snapshot_of_a_host_where_portfwd_is_down_renders() {
        let text = render(Snapshot::default());
        assert!(text.contains("portfwd_up 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert!(!to_classic(&text).contains("# EOF"));
    }
}
