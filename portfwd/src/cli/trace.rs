//! `portfwd trace`: a live stream of what the TC programs decide, until
//! Ctrl-C (or `--count` events, or `--duration`).

use std::{
    collections::HashMap,
    io::Write,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use portfwd_common::Stat;

use crate::{
    datapath::{PinnedMaps, TraceFilter, Traced, Tracer},
    host,
};

pub(crate) struct TraceOptions {
    pub(crate) filter: TraceFilter,
    pub(crate) json: bool,
    pub(crate) count: Option<u64>,
    pub(crate) duration: Option<Duration>,
}

pub(crate) fn trace(pin_dir: &Path, options: &TraceOptions) -> Result<()> {
    host::require_capabilities("trace", host::CHANGE)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("handling Ctrl-C")?;
    let lost_before = lost(pin_dir);
    let mut tracer = Tracer::start(pin_dir, options.filter)?;
    eprintln!("portfwd trace: tracing (Ctrl-C stops)");
    let deadline = options.duration.map(|d| Instant::now() + d);
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    while !stop.load(Ordering::SeqCst)
        && options.count.is_none_or(|n| seen < n)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        let Some(event) = tracer.next(Duration::from_millis(200))? else {
            continue;
        };
        seen += 1;
        let traced = Traced::from_event(&event);
        let interface = if traced.ifindex == 0 {
            String::new()
        } else {
            names
                .entry(traced.ifindex)
                .or_insert_with(|| {
                    host::netlink::ifname(traced.ifindex)
                        .unwrap_or_else(|_| format!("if{}", traced.ifindex))
                })
                .clone()
        };
        let written = if options.json {
            write_json(&mut out, &traced, &interface)
        } else {
            write_line(&mut out, &traced, &interface)
        };
        // A closed pipe (`portfwd trace | head`) ends the trace.
        if written.is_err() {
            break;
        }
        out.flush().ok();
    }
    drop(tracer);
    let lost = lost(pin_dir).saturating_sub(lost_before);
    let lost = if lost > 0 {
        format!(", {lost} lost (the reader was too slow)")
    } else {
        String::new()
    };
    eprintln!("portfwd trace: {seen} events{lost}");
    Ok(())
}

fn lost(pin_dir: &Path) -> u64 {
    PinnedMaps::open_unlocked(pin_dir)
        .map(|maps| {
            maps.stats()
                .into_iter()
                .find(|(stat, _)| *stat == Stat::TraceLost)
                .map_or(0, |(_, n)| n)
        })
        .unwrap_or(0)
}

/// Wall-clock time of a kernel monotonic timestamp, as HH:MM:SS.mmm (UTC).
fn wall_clock(time_ns: u64) -> String {
    let mono_now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default();
    let ago = mono_now.saturating_sub(Duration::from_nanos(time_ns));
    let wall = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::now())
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = wall.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        wall.subsec_millis()
    )
}

fn show(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "?".to_owned(), |a| a.to_string())
}

fn write_line(out: &mut impl Write, t: &Traced, interface: &str) -> std::io::Result<()> {
    let protocol = t.protocol.map_or("?", |p| p.as_str());
    let what = match (t.translated_to, t.masqueraded_as) {
        (Some(to), Some(masq)) => format!("-> {to} (the container sees {masq})"),
        (Some(to), None) => format!("-> {to}"),
        _ => "untranslated".to_owned(),
    };
    let time = wall_clock(t.time_ns);
    if let Some(pid) = t.pid {
        let process = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim_end().to_owned())
            .unwrap_or_default();
        // A translated socket, or one an allowlist refused (EPERM).
        let (event, what) = if t.event == "socket" {
            ("host socket", what)
        } else {
            (t.event, "refused (EPERM)".to_owned())
        };
        return writeln!(
            out,
            "{time} {event:<20} {protocol} {process}[{pid}] -> {} {what} [socket {}]",
            show(t.destination),
            t.path
        );
    }
    let event = if t.event == "flow_new" {
        "new flow"
    } else {
        t.event
    };
    writeln!(
        out,
        "{time} {event:<20} {protocol} {} -> {} {what} [{} {interface}]",
        show(t.source),
        show(t.destination),
        t.path
    )
}

fn write_json(out: &mut impl Write, t: &Traced, interface: &str) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        time: String,
        #[serde(flatten)]
        traced: &'a Traced,
        interface: &'a str,
    }
    let line = Line {
        time: wall_clock(t.time_ns),
        traced: t,
        interface,
    };
    serde_json::to_writer(&mut *out, &line)?;
    writeln!(out)
}
