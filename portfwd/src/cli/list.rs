//! `portfwd list`: the mappings with their counters, the uplinks and the TC
//! programs' stats, as a table or as JSON.

use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::{Context, Result};
use portfwd_common::{MappingCounters, Stat};
use serde::Serialize;

use crate::{
    datapath::{
        self, LinkState, PinnedMaps, StateLock, TcLink,
        kernel::{self, KernelFeatures},
    },
    holder,
    model::{ListedMapping, Mapping},
    ops,
    state::Damaged,
};

/// What `list` shows, read under the state lock.
struct Listing {
    mappings: Vec<(Mapping, MappingCounters)>,
    stats: Vec<(Stat, u64)>,
    /// Interfaces with TC programs pinned, which, and whether the kernel
    /// still runs them there.
    links: Vec<TcLink>,
    /// What the kernel offered at the last `up`.
    kernel: Option<KernelFeatures>,
    /// Whether the port holder runs (else published ports are not
    /// reserved).
    holder_running: bool,
}

/// A mapping as `list --json` shows it, with its counters.
#[derive(Serialize)]
struct MappingJson<'a> {
    #[serde(flatten)]
    mapping: ListedMapping<'a>,
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
    /// Interfaces the kernel runs TC programs on, and which.
    interfaces: BTreeMap<&'a str, &'a [String]>,
    /// Every interface with TC programs pinned, and its state: `attached`,
    /// `severed` (recreated since: nothing runs on the new one) or `gone`.
    links: BTreeMap<&'a str, LinkJson<'a>>,
    /// What the kernel offered at the last `up`.
    kernel: Option<&'a KernelFeatures>,
    holder_running: bool,
}

#[derive(Serialize)]
struct LinkJson<'a> {
    programs: &'a [String],
    state: &'static str,
    uplink: bool,
    /// Packets redirected to it go straight into the container's namespace
    /// (a veth without a queueing discipline of its own).
    into_peer: bool,
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
    match ops::Session::open(pin_dir, "list") {
        Ok(session) => {
            if let Some(fixes) = &session.recovered {
                eprintln!(
                    "portfwd: note: rolled back an interrupted change ({} added, {} removed)",
                    fixes.added.len(),
                    fixes.removed.len()
                );
            }
            read_maps(pin_dir, session.maps())
        }
        // The kernel's maps are what forwards: shown as they are, with the
        // error (which says how to rebuild the file) as a note.
        Err(error) if error.downcast_ref::<Damaged>().is_some() => {
            eprintln!("portfwd: note: {error:#}");
            let lock = StateLock::acquire(pin_dir)?;
            read_maps(pin_dir, &PinnedMaps::open(pin_dir, &lock)?)
        }
        Err(error) => Err(error),
    }
}

fn read_maps(pin_dir: &Path, maps: &PinnedMaps) -> Result<Listing> {
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
        links: datapath::tc_links(pin_dir),
        kernel: kernel::recorded(pin_dir),
        holder_running: holder::is_running(pin_dir),
    })
}

fn write_json(out: &mut impl Write, listing: &Listing) -> Result<()> {
    let json = ListJson {
        mappings: listing
            .mappings
            .iter()
            .map(|(m, c)| MappingJson {
                mapping: ListedMapping::from(m),
                packets_in: c.packets_in,
                bytes_in: c.bytes_in,
                packets_out: c.packets_out,
                bytes_out: c.bytes_out,
                connections: c.connections,
            })
            .collect(),
        stats: listing.stats.iter().map(|(s, n)| (s.name(), *n)).collect(),
        interfaces: listing
            .links
            .iter()
            .filter(|link| link.state == LinkState::Attached)
            .map(|link| (link.ifname.as_str(), link.programs.as_slice()))
            .collect(),
        links: listing
            .links
            .iter()
            .map(|link| {
                let json = LinkJson {
                    programs: &link.programs,
                    state: link.state.as_str(),
                    uplink: link.is_uplink(),
                    into_peer: link.into_peer,
                };
                (link.ifname.as_str(), json)
            })
            .collect(),
        kernel: listing.kernel.as_ref(),
        holder_running: listing.holder_running,
    };
    serde_json::to_writer_pretty(&mut *out, &json)?;
    writeln!(out)?;
    Ok(())
}

fn write_text(out: &mut impl Write, listing: &Listing) -> Result<()> {
    write_mappings(out, listing)?;
    write_links(out, listing)?;
    write_health(out, listing)
}

/// The table of mappings with their counters, then their allowlists.
fn write_mappings(out: &mut impl Write, listing: &Listing) -> Result<()> {
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
    for (m, _) in &listing.mappings {
        if let Some(allow) = &m.allow {
            writeln!(
                out,
                "allow {} {}/{}: {allow} (others: {})",
                m.name, m.host, m.protocol, allow.refuse
            )?;
        }
    }
    if rows.is_empty() {
        writeln!(
            out,
            "(no mappings: add one with `portfwd map CONTAINER_IP PUBLISH`)"
        )?;
    }
    Ok(())
}

/// Where portfwd's programs run: the uplinks, and the container-side links
/// whose replies are not translated.
fn write_links(out: &mut impl Write, listing: &Listing) -> Result<()> {
    let uplinks: Vec<String> = listing
        .links
        .iter()
        .filter(|link| link.is_uplink())
        .map(describe_link)
        .collect();
    let uplinks = if uplinks.is_empty() {
        "(no uplink)".to_owned()
    } else {
        uplinks.join(", ")
    };
    writeln!(out, "external traffic on: {uplinks}")?;
    let unserved: Vec<String> = listing
        .links
        .iter()
        .filter(|link| !link.is_uplink() && link.state != LinkState::Attached)
        .map(describe_link)
        .collect();
    if !unserved.is_empty() {
        writeln!(
            out,
            "replies from containers not translated on: {}",
            unserved.join(", ")
        )?;
    }
    Ok(())
}

/// The holder, the TC counters that are not zero, and what the kernel
/// offered at the last `up`.
fn write_health(out: &mut impl Write, listing: &Listing) -> Result<()> {
    if !listing.holder_running {
        writeln!(
            out,
            "the port holder is not running: published ports are not reserved (another process can bind them; \
             forwarding goes on); `portfwd up` or the next map/unmap restarts it"
        )?;
    }
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

/// An interface with its state, when the kernel no longer runs portfwd's
/// programs on it.
fn describe_link(link: &TcLink) -> String {
    let name = &link.ifname;
    match link.state {
        LinkState::Attached => name.clone(),
        LinkState::Gone if link.is_uplink() => format!(
            "{name} (gone: the interface was deleted; attached again if it comes back, `portfwd detach {name}` forgets it)"
        ),
        LinkState::Gone => format!("{name} (gone: the interface was deleted)"),
        LinkState::Severed => format!(
            "{name} (severed: recreated since it was attached, nothing runs on it; the port holder, `portfwd up` or the next map/unmap attaches again)"
        ),
    }
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
