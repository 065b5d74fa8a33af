//! The CLI commands, on top of the library: each parses its arguments fully
//! before touching any state, so bad input changes nothing.

use std::{net::IpAddr, path::Path};

use anyhow::{Result, bail};

pub(crate) use super::list::list;
use crate::{
    datapath::LinkState,
    error::Error,
    model::{self, PublishSpec, UnmapSelector},
    ops::{self, Missing, UpOptions},
};

pub(crate) fn up(options: &UpOptions) -> Result<()> {
    let report = ops::up(options)?;
    for m in ops::sweep_orphans(&options.pin_dir)? {
        println!(
            "removed (its owner process is gone) {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        );
    }
    if let Some(kernel) = &report.kernel {
        println!("{}", kernel.summary());
    }
    let install = &report.install;
    if !install.uplinks_attached.is_empty() {
        println!(
            "external traffic: attached to {}",
            install.uplinks_attached.join(", ")
        );
    }
    if install.uplinks_attached.is_empty() && install.uplinks_already.is_empty() {
        println!(
            "external traffic: no uplink (no default route, no --iface); add one with `portfwd attach IF`"
        );
    }
    if !install.replaced.is_empty() {
        println!("replaced by this build: {}", install.replaced.join(", "));
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
    for note in &install.notes {
        eprintln!("portfwd: note: {note}");
    }
    if install.attached.is_empty() {
        println!(
            "portfwd is already up ({} mapping{}), pinned under {}",
            report.mappings,
            plural(report.mappings),
            options.pin_dir.display()
        );
    } else {
        println!(
            "portfwd is up: {} attached to {}, pinned under {} ({} mapping{})",
            install.attached.join(", "),
            install.cgroup.display(),
            options.pin_dir.display(),
            report.mappings,
            plural(report.mappings)
        );
    }
    Ok(())
}

pub(crate) fn down(pin_dir: &Path, keep_state: bool) -> Result<()> {
    let report = ops::down(pin_dir, keep_state)?;
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
pub(crate) fn map(
    pin_dir: &Path,
    name: Option<&str>,
    container_ip: &str,
    publish: &[String],
    force: bool,
    (allow, refuse): (&[String], model::Refuse),
) -> Result<()> {
    let container_ip: IpAddr = container_ip.parse().map_err(|_| {
        Error::usage(format!(
            "invalid container address {container_ip:?}: expected an IPv4 or IPv6 address"
        ))
    })?;
    model::check_container_ip(container_ip)?;
    // Unnamed mappings are named after their container, so that
    // `portfwd unmap --name ADDRESS` removes them together.
    let name = name
        .map(str::to_owned)
        .unwrap_or_else(|| container_ip.to_string());
    model::check_name(&name)?;
    let specs = publish
        .iter()
        .map(|text| text.parse::<PublishSpec>())
        .collect::<Result<Vec<_>, _>>()?;

    let allow = if allow.is_empty() {
        None
    } else {
        let list = model::Allowlist::parse(allow).map_err(Error::usage)?;
        Some(model::Allowlist { refuse, ..list })
    };
    let options = ops::PublishOptions {
        refuse_ports_in_use: !force,
        allow,
        ..ops::PublishOptions::default()
    };
    let published = ops::publish_with(pin_dir, &name, container_ip, &specs, options)?;
    let planned = published.mappings;
    for note in &published.notes {
        eprintln!("portfwd: note: {note}");
    }
    for busy in &published.busy_ports {
        eprintln!("portfwd: note: {busy} is held by another process: portfwd cannot reserve it");
    }
    print_lines(planned.iter().map(|m| {
        let allow = m
            .allow
            .as_ref()
            .map(|list| format!(" (allow {list}; others: {})", list.refuse))
            .unwrap_or_default();
        format!(
            "published {}: {}/{} -> {}{allow}",
            m.name, m.host, m.protocol, m.container
        )
    }))
}

/// One line per mapping, in one write rather than one per line (a range
/// of 10,000 ports prints 10,000 lines).
fn print_lines(lines: impl Iterator<Item = String>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// `portfwd apply -f FILE [--dry-run]`: the whole set, all or nothing.
pub(crate) fn apply(pin_dir: &Path, file: &Path, dry_run: bool) -> Result<()> {
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
    for note in &diff.notes {
        eprintln!("portfwd: note: {note}");
    }
    Ok(())
}

/// `portfwd attach IF`: external traffic arriving on IF is forwarded.
pub(crate) fn attach(pin_dir: &Path, ifname: &str) -> Result<()> {
    if ops::attach(pin_dir, ifname)? {
        println!("attached to {ifname}: external traffic to published ports is forwarded");
    } else {
        println!("already attached to {ifname}");
    }
    Ok(())
}

/// `portfwd detach IF`: mappings and the socket path are untouched.
pub(crate) fn detach(pin_dir: &Path, ifname: &str) -> Result<()> {
    let detached = ops::detach(pin_dir, ifname)?;
    match detached.was {
        None => println!("nothing was attached to {ifname}"),
        Some(LinkState::Gone) => println!(
            "{ifname} is gone (deleted, and its programs with it): portfwd no longer attaches to it when it comes back"
        ),
        Some(LinkState::Severed) => println!(
            "{ifname} was recreated since it was attached (no program of portfwd's ran on it): portfwd no longer attaches to it"
        ),
        Some(LinkState::Attached) => println!(
            "detached {} program{} from {ifname}",
            detached.programs,
            plural(detached.programs)
        ),
    }
    Ok(())
}

/// `portfwd unmap --name NAME` or `portfwd unmap SELECTOR...`: all or nothing.
pub(crate) fn unmap(pin_dir: &Path, name: Option<&str>, selectors: &[String]) -> Result<()> {
    let selectors = selectors
        .iter()
        .map(|text| text.parse::<UnmapSelector>())
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_none() && selectors.is_empty() {
        bail!(Error::usage(
            "unmap needs --name NAME or at least one [HOSTIP:]HOSTPORT[/PROTO]"
        ));
    }

    let withdrawn = ops::withdraw(pin_dir, name, &selectors, Missing::Error)?;
    for note in &withdrawn.notes {
        eprintln!("portfwd: note: {note}");
    }
    print_lines(withdrawn.mappings.iter().map(|m| {
        format!(
            "removed {}: {}/{} -> {}",
            m.name, m.host, m.protocol, m.container
        )
    }))
}

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `portfwd state rebuild`: the state file, from the kernel's maps.
pub(crate) fn rebuild_state(pin_dir: &Path) -> Result<()> {
    let rebuilt = ops::rebuild_state(pin_dir)?;
    if let Some(damaged) = &rebuilt.damaged {
        println!("moved the damaged state file to {}", damaged.display());
    }
    println!(
        "rebuilt {} from the kernel's maps: {} mapping{}",
        rebuilt.path.display(),
        rebuilt.mappings,
        plural(rebuilt.mappings)
    );
    Ok(())
}
