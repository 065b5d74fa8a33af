//! chart.png: ratios to direct (top), connection rate against the number of
//! mappings (bottom left) and control-plane times (bottom right). Text is
//! drawn with Debian's DejaVu Sans (fonts-dejavu-core), read at run time.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::measure::{Metric, PATHS};
use super::modes::Mode;
use super::report::median;
use super::{Plan, Results, SCALE, Update};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(150, 150, 150),
        Mode::Iptables => RGBColor(230, 130, 30),
        Mode::Nft => RGBColor(140, 90, 190),
        Mode::DockerProxy => RGBColor(210, 50, 50),
        Mode::Portfwd => RGBColor(30, 140, 80),
    }
}

/// (label, metric, inverted: plot direct/mode so that higher is better).
const RATIO_METRICS: [(&str, Metric, bool); 7] = [
    ("TCP", Metric::TcpGbps, false),
    ("req/s", Metric::KaRps, false),
    ("1/p99", Metric::KaP99Ms, true),
    ("conn/s", Metric::ConnPerS, false),
    ("1/conn p99", Metric::ConnP99Ms, true),
    ("UDP", Metric::UdpRps, false),
    ("UDP 4K", Metric::Udp4kRps, false),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

pub(crate) fn draw(plan: &Plan, r: &Results, png: &Path) -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| format!("reading {FONT}"))?;
    let bytes: &'static [u8] = Vec::leak(bytes);
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

    let root = BitMapBackend::new(png, (1500, 1050)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(560);
    ratios(plan, r, &top, &root)?;
    let (left, right) = bottom.split_horizontally(820);
    scale(plan, r, &left, &root)?;
    updates(plan, r, &right, &root)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Grouped bars: `groups` labels along x, one bar per series in each group.
struct Bars<'a> {
    title: String,
    y_desc: &'a str,
    groups: Vec<String>,
    /// Captions under runs of groups: (first group, last group, caption).
    captions: Vec<(usize, usize, String)>,
    series: Vec<(Mode, String, Vec<Option<f64>>)>,
    log: bool,
    reference: Option<f64>,
    /// Bars above this are cut there, their value written on them.
    cap: Option<f64>,
}

/// A bar chart's plot: f64 groups along x, values on a linear or log y.
type Plot<'a, Y> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>;

fn draw_bars(bars: Bars, area: &Area, root: &Area) -> Result<()> {
    let n = bars.groups.len().max(1) as f64;
    let values = bars
        .series
        .iter()
        .flat_map(|s| s.2.iter().flatten().copied());
    let cap = bars.cap.unwrap_or(f64::INFINITY);
    let max = values
        .clone()
        .fold(bars.reference.unwrap_or(0.0), f64::max)
        .min(cap)
        .max(1e-3);
    let min = values.fold(f64::INFINITY, f64::min);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&bars.title, ("sans-serif", 22))
        .margin(12)
        .margin_bottom(48)
        .x_label_area_size(10)
        .y_label_area_size(70);
    if bars.log {
        let lo = 10f64.powf((min.max(1e-3)).log10().floor());
        let hi = 10f64.powf(max.log10().ceil() + 0.6);
        let mut chart = builder
            .build_cartesian_2d(-0.5..n - 0.5, (lo..hi).log_scale())
            .map_err(err)?;
        draw_plot(&mut chart, lo, &bars, root)
    } else {
        let mut chart = builder
            .build_cartesian_2d(
                -0.5..n - 0.5,
                0.0..max * if bars.cap.is_some() { 1.15 } else { 1.4 },
            )
            .map_err(err)?;
        draw_plot(&mut chart, 0.0, &bars, root)
    }
}

/// The mesh, the bars from `floor` up, the legend and the labels under x.
fn draw_plot<'a, Y>(chart: &mut Plot<'a, Y>, floor: f64, bars: &Bars, root: &Area) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(bars.y_desc)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    draw_series(chart, floor, bars, root)?;
    if let Some(y) = bars.reference {
        let n = bars.groups.len().max(1) as f64;
        chart
            .draw_series(LineSeries::new(
                [(-0.5, y), (n - 0.5, y)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    draw_group_labels(chart, floor, bars, root)
}

/// One bar per series in each group; a bar above the cap is cut there,
/// its value written on it.
fn draw_series<Y>(chart: &mut Plot<'_, Y>, floor: f64, bars: &Bars, root: &Area) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let cap = bars.cap.unwrap_or(f64::INFINITY);
    let width = 0.8 / bars.series.len().max(1) as f64;
    let bar = |chart_x: f64, i: usize| {
        (
            chart_x - 0.4 + width * i as f64,
            chart_x - 0.4 + width * (i as f64 + 1.0),
        )
    };
    for (i, (mode, name, vals)) in bars.series.iter().enumerate() {
        let style = color(*mode).filled();
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(g, v)| {
                let (x0, x1) = bar(g as f64, i);
                v.map(|v| Rectangle::new([(x0, floor), (x1, v.min(cap))], style))
            }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], style));
        let cut = ("sans-serif", 13).into_font().color(&BLACK);
        for (g, v) in vals.iter().enumerate() {
            if let Some(v) = v.filter(|&v| v > cap) {
                let (x0, _) = bar(g as f64, i);
                let (px, py) = chart.backend_coord(&(x0, cap));
                root.draw(&Text::new(format!("{v:.1}"), (px, py - 16), cut.clone()))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

/// Each group's label under it, and the captions under runs of groups.
fn draw_group_labels<Y>(chart: &Plot<'_, Y>, floor: f64, bars: &Bars, root: &Area) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let label = ("sans-serif", 15).into_font().color(&BLACK);
    for (g, text) in bars.groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64, floor));
        let w = text.chars().count() as i32 * 4;
        root.draw(&Text::new(text.clone(), (px - w, py + 6), label.clone()))
            .map_err(err)?;
    }
    let caption = ("sans-serif", 17).into_font().color(&BLACK);
    for (first, last, text) in &bars.captions {
        let mid = (*first as f64 + *last as f64) / 2.0;
        let (px, py) = chart.backend_coord(&(mid, floor));
        let w = text.chars().count() as i32 * 4;
        root.draw(&Text::new(text.clone(), (px - w, py + 26), caption.clone()))
            .map_err(err)?;
    }
    Ok(())
}

fn ratios(plan: &Plan, r: &Results, area: &Area, root: &Area) -> Result<()> {
    let modes: Vec<Mode> = plan
        .modes
        .iter()
        .copied()
        .filter(|&m| m != Mode::Direct)
        .collect();
    let mut groups = Vec::new();
    let mut captions = Vec::new();
    for path in PATHS {
        let first = groups.len();
        groups.extend(RATIO_METRICS.iter().map(|(label, _, _)| label.to_string()));
        captions.push((first, groups.len() - 1, format!("{} path", path.name())));
    }
    let series = modes
        .iter()
        .map(|&mode| {
            let vals = PATHS
                .iter()
                .flat_map(|&path| {
                    RATIO_METRICS.iter().map(move |&(_, metric, inverted)| {
                        r.vs_direct(mode, path, metric)
                            .map(|x| if inverted { 1.0 / x } else { x })
                    })
                })
                .collect();
            (mode, mode.name().to_owned(), vals)
        })
        .collect();
    draw_bars(
        Bars {
            title: format!(
                "Ratio to direct (no NAT), higher is better; median of {} repetition(s)",
                plan.reps
            ),
            y_desc: "× direct",
            groups,
            captions,
            series,
            log: false,
            reference: Some(1.0),
            cap: Some(2.0),
        },
        area,
        root,
    )
}

fn scale(plan: &Plan, r: &Results, area: &Area, root: &Area) -> Result<()> {
    let modes: Vec<Mode> = plan.modes.iter().copied().filter(|m| m.scales()).collect();
    let mut ns = vec![1];
    ns.extend(&plan.scales);
    let mut groups = Vec::new();
    let mut captions = Vec::new();
    for path in PATHS {
        let first = groups.len();
        groups.extend(ns.iter().map(|n| format!("{n}")));
        captions.push((first, groups.len() - 1, format!("{} path", path.name())));
    }
    let series = modes
        .iter()
        .map(|&mode| {
            let vals = PATHS
                .iter()
                .flat_map(|&path| {
                    ns.iter()
                        .map(move |&n| r.med(mode, path, n, Metric::ConnPerS))
                })
                .collect();
            (mode, mode.name().to_owned(), vals)
        })
        .collect();
    draw_bars(
        Bars {
            title: "New connections/s with N other mappings installed".into(),
            y_desc: "connections/s",
            groups,
            captions,
            series,
            log: false,
            reference: None,
            cap: None,
        },
        area,
        root,
    )
}

fn updates(plan: &Plan, r: &Results, area: &Area, root: &Area) -> Result<()> {
    let modes: Vec<Mode> = plan.modes.iter().copied().filter(|m| m.scales()).collect();
    let ops = [
        (Update::InstallAll, format!("install {}k", SCALE / 1000)),
        (Update::AddOne, "add one".to_owned()),
        (Update::RemoveOne, "remove one".to_owned()),
    ];
    let series = modes
        .iter()
        .map(|&mode| {
            let vals = ops
                .iter()
                .map(|(op, _)| {
                    r.updates
                        .get(&(mode, *op))
                        .filter(|v| !v.is_empty())
                        .map(|v| median(v))
                })
                .collect();
            (mode, mode.name().to_owned(), vals)
        })
        .collect();
    draw_bars(
        Bars {
            title: format!("Control plane with {}k mappings (ms, log)", SCALE / 1000),
            y_desc: "ms per CLI call",
            groups: ops.iter().map(|(_, l)| l.clone()).collect(),
            captions: vec![],
            series,
            log: true,
            reference: None,
            cap: None,
        },
        area,
        root,
    )
}
