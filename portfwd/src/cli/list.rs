//! `portfwd list`: the mappings with their counters, the uplinks and the TC
//! programs' stats, as a table or as JSON.

use std::{collections::BTreeMap, io::Write, net::IpAddr, path::Path};

use anyhow::{Context, Result};
use portfwd_common::{MappingCounters, Stat, UPLINK_PROGRAMS};
use serde::Serialize;

use crate::{
    datapath::{
        self,
        kernel::{self, KernelFeatures},
    },
    model::Mapping,
    ops,
};

/// What `list` shows, read under the state lock.
struct Listing {
    mappings: Vec<(Mapping, MappingCounters)>,
    stats: Vec<(Stat, u64)>,
    /// Interfaces with TC programs, and which.
    interfaces: Vec<(String, Vec<String>)>,
    /// What the kernel offered at the last `up`.
    kernel: Option<KernelFeatures>,
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
    stats: BTreeMap<&'static str, u64>,
    /// Interfaces with TC programs, and which.
    interfaces: BTreeMap<&'a str, &'a [String]>,
    /// What the kernel offered at the last `up`.
    kernel: Option<&'a KernelFeatures>,
}

pub(crate) fn list(pin_dir: &Path, json: bool) -> Result<()> {
    let listing = read(pin_dir)?;
    let mut out = std::io::stdout().lock();
    if json {
        write_json(&mut out, &listing)
    } else {
        write_text(&mut out, &listing)
    }
}

fn read(pin_dir: &Path) -> Result<Listing> {
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
    let mappings = maps
        .mappings()?
        .into_iter()
        .map(|m| {
            let counters = maps.counters(&m);
            (m, counters)
        })
        .collect();
    Ok(Listing {
        mappings,
        stats: maps.stats(),
        interfaces: datapath::tc_attachments(pin_dir),
        kernel: kernel::recorded(pin_dir),
    })
}

fn write_json(out: &mut impl Write, listing: &Listing) -> Result<()> {
    let json = ListJson {
        mappings: listing
            .mappings
            .iter()
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
        stats: listing.stats.iter().map(|(s, n)| (s.name(), *n)).collect(),
        interfaces: listing
            .interfaces
            .iter()
            .map(|(name, programs)| (name.as_str(), programs.as_slice()))
            .collect(),
        kernel: listing.kernel.as_ref(),
    };
    serde_json::to_writer_pretty(&mut *out, &json)?;
    writeln!(out)?;
    Ok(())
}

fn write_text(out: &mut impl Write, listing: &Listing) -> Result<()> {
    let rows: Vec<[String; 7]> = listing
        .mappings
        .iter()
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
    write_table(out, header, &rows).context("writing the table")?;
    if rows.is_empty() {
        writeln!(
            out,
            "(no mappings: add one with `portfwd map CONTAINER_IP PUBLISH`)"
        )?;
    }
    let uplinks: Vec<&str> = listing
        .interfaces
        .iter()
        .filter(|(_, programs)| programs.iter().any(|p| p == UPLINK_PROGRAMS[0].name))
        .map(|(name, _)| name.as_str())
        .collect();
    let uplinks = if uplinks.is_empty() {
        "(no uplink)".to_owned()
    } else {
        uplinks.join(", ")
    };
    writeln!(out, "external traffic on: {uplinks}")?;
    let counted: Vec<String> = listing
        .stats
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(stat, n)| format!("{}={n}", stat.name()))
        .collect();
    if !counted.is_empty() {
        writeln!(out, "tc: {}", counted.join(" "))?;
    }
    if let Some(kernel) = &listing.kernel {
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

pub(super) fn write_table<const N: usize>(
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
