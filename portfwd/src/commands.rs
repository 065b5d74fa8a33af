//! The CLI commands, on top of the library: each parses its arguments fully
//! before touching any state, so bad input changes nothing.

use std::{io::Write, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    UsageError, host,
    loader::{self, UpOptions},
    mapping::{self, Mapping, UnmapSelector},
    maps::{PinnedMaps, StateLock},
    publish::PublishSpec,
};

pub fn up(options: &UpOptions) -> Result<()> {
    let report = loader::up(options)?;
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

pub fn down(pin_dir: &Path) -> Result<()> {
    let report = loader::down(pin_dir)?;
    if report.was_up {
        println!(
            "portfwd is down: {} program{} detached, {} mapping{} removed",
            report.detached,
            plural(report.detached),
            report.mappings_dropped,
            plural(report.mappings_dropped)
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

    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    let mut maps = PinnedMaps::open(pin_dir, &lock)?;
    let existing = maps.mappings()?;
    let planned = mapping::plan(&name, container_ip, &specs, &existing, host::port_in_use)?;
    // Wildcard mappings serve the host's addresses as they are now.
    maps.sync_local_addrs(&host::local_addresses()?)?;
    maps.add_all(&planned)?;
    for m in &planned {
        println!(
            "published {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
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

    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    let mut maps = PinnedMaps::open(pin_dir, &lock)?;
    let existing = maps.mappings()?;
    let mut doomed: Vec<Mapping> = Vec::new();
    if let Some(name) = name {
        let named: Vec<&Mapping> = existing.iter().filter(|m| m.name == name).collect();
        if named.is_empty() {
            bail!("no mapping is named {name:?}");
        }
        doomed.extend(named.into_iter().cloned());
    }
    for selector in &selectors {
        let matched: Vec<&Mapping> = existing.iter().filter(|m| selector.matches(m)).collect();
        if matched.is_empty() {
            bail!("nothing is published on {selector}");
        }
        doomed.extend(
            matched
                .into_iter()
                .filter(|m| !doomed.contains(m))
                .cloned()
                .collect::<Vec<_>>(),
        );
    }
    maps.remove_all(&doomed)?;
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
}

pub fn list(pin_dir: &Path, json: bool) -> Result<()> {
    host::require_root()?;
    let lock = StateLock::acquire(pin_dir)?;
    let mappings = PinnedMaps::open(pin_dir, &lock)?.mappings()?;
    drop(lock);
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<MappingJson> = mappings
            .iter()
            .map(|m| MappingJson {
                name: &m.name,
                protocol: m.protocol.as_str(),
                host_ip: m.host.ip(),
                host_port: m.host.port(),
                container_ip: m.container.ip(),
                container_port: m.container.port(),
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    let rows: Vec<[String; 4]> = mappings
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.protocol.to_string(),
                m.host.to_string(),
                m.container.to_string(),
            ]
        })
        .collect();
    write_table(&mut out, ["NAME", "PROTO", "HOST", "CONTAINER"], &rows)
        .context("writing the table")?;
    if rows.is_empty() {
        writeln!(
            out,
            "(no mappings: add one with `portfwd map CONTAINER_IP PUBLISH`)"
        )?;
    }
    Ok(())
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
