//! The CLI commands, on top of the library: each parses its arguments fully
//! before touching any state, so bad input changes nothing.

use std::{io::Write, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    UsageError,
    loader::{self, UpOptions},
    mapping::{self, UnmapSelector},
    ops::{self, Missing},
    publish::PublishSpec,
};

pub fn up(options: &UpOptions) -> Result<()> {
    let report = loader::up(options)?;
    if let Some(kernel) = &report.kernel {
        println!("{}", kernel.summary());
    }
    for m in ops::sweep_orphans(&options.pin_dir)? {
        println!(
            "removed (its owner process is gone) {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    if !report.uplinks_attached.is_empty() {
        println!(
            "external traffic: attached to {}",
            report.uplinks_attached.join(", ")
        );
    }
    if report.uplinks_attached.is_empty() && report.uplinks_already.is_empty() {
        println!(
            "external traffic: no uplink (no default route, no --iface); add one with `portfwd attach IF`"
        );
    }
    if !report.replaced.is_empty() {
        println!("replaced by this build: {}", report.replaced.join(", "));
    }
    if report.adopted && report.mappings > 0 {
        println!("recorded the current mappings as the state");
    }
    for m in &report.fixes.added {
        println!(
            "restored {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    for m in &report.fixes.removed {
        println!(
            "removed (not in the state file) {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    for busy in &report.busy_ports {
        eprintln!("portfwd: note: {busy} is held by another process: portfwd cannot reserve it");
    }
    for note in &report.notes {
        eprintln!("portfwd: note: {note}");
    }
    if report.attached.is_empty() {
        println!(
            "portfwd is already up ({} mapping{}), pinned under {}",
            report.mappings,
            plural(report.mappings),
            options.pin_dir.display()
        );
    } else {
        println!(
            "portfwd is up: {} attached to {}, pinned under {} ({} mapping{})",
            report.attached.join(", "),
            report.cgroup.display(),
            options.pin_dir.display(),
            report.mappings,
            plural(report.mappings)
        );
    }
    Ok(())
}

pub fn down(pin_dir: &Path, keep_state: bool) -> Result<()> {
    let report = loader::down(pin_dir, keep_state)?;
    if report.was_up {
        println!(
            "portfwd is down: {} program{} detached, {} mapping{} {}",
            report.detached,
            plural(report.detached),
            report.mappings_dropped,
            plural(report.mappings_dropped),
            if keep_state {
                "kept in the state file for the next `up`"
            } else {
                "removed"
            }
        );
    } else {
        println!(
            "portfwd is not up ({} does not exist): nothing to do",
            pin_dir.display()
        );
    }
    Ok(())
}

/// `portfwd map [--name NAME] CONTAINER_IP PUBLISH...`: all or nothing.
pub fn map(
    pin_dir: &Path,
    name: Option<&str>,
    container_ip: &str,
    publish: &[String],
    force: bool,
) -> Result<()> {
    let container_ip: IpAddr = container_ip.parse().map_err(|_| {
        UsageError(format!(
            "invalid container address {container_ip:?}: expected an IPv4 or IPv6 address"
        ))
    })?;
    mapping::check_container_ip(container_ip)?;
    // Unnamed mappings are named after their container, so that
    // `portfwd unmap --name ADDRESS` removes them together.
    let name = name
        .map(str::to_owned)
        .unwrap_or_else(|| container_ip.to_string());
    mapping::check_name(&name)?;
    let specs = publish
        .iter()
        .map(|text| text.parse::<PublishSpec>())
        .collect::<Result<Vec<_>, _>>()?;

    let options = ops::PublishOptions {
        refuse_ports_in_use: !force,
        ..ops::PublishOptions::default()
    };
    let published = ops::publish_with(pin_dir, &name, container_ip, &specs, options)?;
    let planned = published.mappings;
    for busy in &published.busy_ports {
        eprintln!("portfwd: note: {busy} is held by another process: portfwd cannot reserve it");
    }
    for m in &planned {
        println!(
            "published {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    Ok(())
}

/// `portfwd apply -f FILE [--dry-run]`: the whole set, all or nothing.
pub fn apply(pin_dir: &Path, file: &Path, dry_run: bool) -> Result<()> {
    let parsed = ops::read_apply_file(file)?;
    let diff = ops::apply(pin_dir, &parsed, dry_run)?;
    for m in &diff.removed {
        println!("- {} {}/{} -> {}", m.name, m.host, m.protocol, m.container);
    }
    for m in &diff.added {
        println!("+ {} {}/{} -> {}", m.name, m.host, m.protocol, m.container);
    }
    println!(
        "{}{} added, {} removed, {} unchanged",
        if dry_run { "dry run: " } else { "" },
        diff.added.len(),
        diff.removed.len(),
        diff.kept
    );
    Ok(())
}

/// `portfwd attach IF`: external traffic arriving on IF is forwarded.
pub fn attach(pin_dir: &Path, ifname: &str) -> Result<()> {
    if loader::attach_uplink(pin_dir, ifname)? {
        println!("attached to {ifname}: external traffic to published ports is forwarded");
    } else {
        println!("already attached to {ifname}");
    }
    Ok(())
}

/// `portfwd detach IF`: mappings and the socket path are untouched.
pub fn detach(pin_dir: &Path, ifname: &str) -> Result<()> {
    let detached = loader::detach_interface(pin_dir, ifname)?;
    if detached == 0 {
        println!("nothing was attached to {ifname}");
    } else {
        println!(
            "detached {detached} program{} from {ifname}",
            plural(detached)
        );
    }
    Ok(())
}

/// `portfwd unmap --name NAME` or `portfwd unmap SELECTOR...`: all or nothing.
pub fn unmap(pin_dir: &Path, name: Option<&str>, selectors: &[String]) -> Result<()> {
    let selectors = selectors
        .iter()
        .map(|text| text.parse::<UnmapSelector>())
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_none() && selectors.is_empty() {
        bail!(UsageError(
            "unmap needs --name NAME or at least one [HOSTIP:]HOSTPORT[/PROTO]".into()
        ));
    }

    let doomed = ops::withdraw(pin_dir, name, &selectors, Missing::Error)?;
    for m in &doomed {
        println!(
            "removed {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct MappingJson<'a> {
    name: &'a str,
    protocol: &'a str,
    host_ip: IpAddr,
    host_port: u16,
    container_ip: IpAddr,
    container_port: u16,
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
    connections: u64,
}

#[derive(Serialize)]
struct ListJson<'a> {
    mappings: Vec<MappingJson<'a>>,
    /// What the TC programs saw and did, by name.
    stats: std::collections::BTreeMap<&'static str, u64>,
    /// Interfaces with TC programs, and which.
    interfaces: std::collections::BTreeMap<String, Vec<String>>,
    /// What the kernel offered at the last `up`.
    kernel: Option<crate::kernel_features::KernelFeatures>,
}

pub fn list(pin_dir: &Path, json: bool) -> Result<()> {
    // A session: a change a killed process left half done is rolled back
    // first, so the listing is always a whole state.
    let session = ops::Session::open(pin_dir, "list")?;
    if let Some(fixes) = &session.recovered {
        eprintln!(
            "portfwd: note: rolled back an interrupted change ({} added, {} removed)",
            fixes.added.len(),
            fixes.removed.len()
        );
    }
    let maps = session.maps();
    let mappings = maps.mappings()?;
    let counters: Vec<_> = mappings.iter().map(|m| maps.counters(m)).collect();
    let stats = maps.stats()?;
    let interfaces = loader::tc_attachments(pin_dir);
    let kernel = crate::kernel_features::recorded(pin_dir);
    drop(session);
    let mut out = std::io::stdout().lock();
    if json {
        let listing = ListJson {
            mappings: mappings
                .iter()
                .zip(&counters)
                .map(|(m, c)| MappingJson {
                    name: &m.name,
                    protocol: m.protocol.as_str(),
                    host_ip: m.host.ip(),
                    host_port: m.host.port(),
                    container_ip: m.container.ip(),
                    container_port: m.container.port(),
                    packets_in: c.packets_in,
                    bytes_in: c.bytes_in,
                    packets_out: c.packets_out,
                    bytes_out: c.bytes_out,
                    connections: c.connections,
                })
                .collect(),
            stats: portfwd_common::STAT_NAMES.into_iter().zip(stats).collect(),
            interfaces: interfaces.into_iter().collect(),
            kernel,
        };
        serde_json::to_writer_pretty(&mut out, &listing)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<[String; 7]> = mappings
        .iter()
        .zip(&counters)
        .map(|(m, c)| {
            [
                m.name.clone(),
                m.protocol.to_string(),
                m.host.to_string(),
                m.container.to_string(),
                c.connections.to_string(),
                format!("{}/{}", c.packets_in, human_bytes(c.bytes_in)),
                format!("{}/{}", c.packets_out, human_bytes(c.bytes_out)),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "PROTO",
        "HOST",
        "CONTAINER",
        "CONNS",
        "IN PKTS/BYTES",
        "OUT PKTS/BYTES",
    ];
    write_table(&mut out, header, &rows).context("writing the table")?;
    if rows.is_empty() {
        writeln!(
            out,
            "(no mappings: add one with `portfwd map CONTAINER_IP PUBLISH`)"
        )?;
    }
    let uplinks: Vec<&str> = interfaces
        .iter()
        .filter(|(_, programs)| programs.iter().any(|p| p == "pf_tc_uplink_in"))
        .map(|(name, _)| name.as_str())
        .collect();
    writeln!(
        out,
        "external traffic on: {}",
        if uplinks.is_empty() {
            "(no uplink)".to_owned()
        } else {
            uplinks.join(", ")
        }
    )?;
    let passed: Vec<String> = portfwd_common::STAT_NAMES
        .iter()
        .zip(stats)
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    if !passed.is_empty() {
        writeln!(out, "tc: {}", passed.join(" "))?;
    }
    if let Some(kernel) = kernel {
        writeln!(out, "{}", kernel.summary())?;
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn write_table<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| -> std::io::Result<()> {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        writeln!(out, "{}", padded.join("  ").trim_end())
    };
    line(out, header.to_vec())?;
    for row in rows {
        line(out, row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
