//! Publishing and withdrawing mappings (`map`, `unmap`, CNI ADD/DEL).

use std::{net::IpAddr, path::Path};

use anyhow::{Result, bail};

use super::Session;
use crate::{
    host,
    model::{self, Mapping, PublishSpec, UnmapSelector},
};

/// How `publish` treats host ports that another process already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishOptions {
    /// Refuse (exit 1, nothing changed) to publish a port a host process
    /// holds, naming it. Off for `--force`, and for runtimes that hold their
    /// containers' ports themselves (podman's conmon).
    pub(crate) refuse_ports_in_use: bool,
    /// Have the holder bind the host ports (off when the runtime binds
    /// them itself, as podman's conmon does, after the CNI ADD).
    pub(crate) hold_ports: bool,
    /// The source allowlist of every mapping published (`--allow`).
    pub(crate) allow: Option<model::Allowlist>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            refuse_ports_in_use: true,
            hold_ports: true,
            allow: None,
        }
    }
}

/// What `publish` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) mappings: Vec<Mapping>,
    /// Published ports the holder could not bind (another process holds them).
    pub(crate) busy_ports: Vec<String>,
    /// What publishing repaired on the way (see `Session::open_for_change`).
    pub(crate) notes: Vec<String>,
}

/// Publishes `specs` for a container, all or nothing.
pub(crate) fn publish_with(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    options: PublishOptions,
) -> Result<Published> {
    publish_checked(pin_dir, name, container_ip, specs, options, |_, _| Ok(()))
}

/// `publish_with`, refused (nothing changed) when `check` refuses the
/// planned mappings, given with the published ones, under the state lock.
pub(crate) fn publish_checked(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    options: PublishOptions,
    check: impl FnOnce(&[Mapping], &[Mapping]) -> Result<()>,
) -> Result<Published> {
    let mut session = Session::open_for_change(pin_dir, "map")?;
    let notes = std::mem::take(&mut session.notes);
    let ports = model::explicit_ports(specs, container_ip);
    let existing = session.conflict_candidates(ports.as_deref())?;
    let busy = host::BusyPorts::new();
    let in_use = |p, port| busy.any(p, port);
    let (mut planned, replaced) = match model::plan(name, container_ip, specs, &existing, in_use) {
        Ok(planned) => (planned, Vec::new()),
        Err(error) => replan(name, container_ip, specs, &existing, in_use).ok_or(error)?,
    };
    if options.refuse_ports_in_use {
        // A port this mapping publishes already is held by portfwd itself.
        let new_ports: Vec<Mapping> = planned
            .iter()
            .filter(|m| !replaced.iter().any(|old| old.host == m.host))
            .cloned()
            .collect();
        refuse_ports_in_use(&new_ports, &busy)?;
    }
    check(&planned, &existing)?;
    let ifindex = session.prepare_backend_path(container_ip)?;
    for m in &mut planned {
        m.ifindex = ifindex;
        m.hold = options.hold_ports;
        // Each mapping keeps the networks of its own family, as the
        // kernel's entries (and so the state file) hold them.
        m.allow = options
            .allow
            .as_ref()
            .map(|a| a.for_family(m.host.is_ipv4()));
    }
    // Wildcard mappings serve the host's addresses as they are now.
    session.maps.sync_local_addrs(&host::local_addresses()?)?;
    session.change(&replaced, &planned)?;
    let busy_ports = session.finish()?.busy_ports;
    Ok(Published {
        mappings: planned,
        busy_ports,
        notes,
    })
}

/// `map` again of ports that this very mapping (same name and container)
/// already publishes, to change its allowlist: the mappings planned and
/// those they replace; None unless every planned mapping replaces one with
/// the same endpoints and conflicts with nothing else.
fn replan(
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    existing: &[Mapping],
    in_use: impl Fn(model::Protocol, u16) -> bool,
) -> Option<(Vec<Mapping>, Vec<Mapping>)> {
    let ours = |m: &Mapping| m.name == name && m.container.ip() == container_ip;
    let others: Vec<Mapping> = existing.iter().filter(|m| !ours(m)).cloned().collect();
    let planned = model::plan(name, container_ip, specs, &others, in_use).ok()?;
    let same_endpoints = |a: &Mapping, b: &Mapping| {
        (a.protocol, a.host, a.container) == (b.protocol, b.host, b.container)
    };
    let mut replaced = Vec::new();
    for new in &planned {
        let old = existing
            .iter()
            .find(|old| ours(old) && same_endpoints(old, new))?;
        replaced.push(old.clone());
    }
    let clash = existing
        .iter()
        .filter(|old| !replaced.contains(old))
        .any(|old| planned.iter().any(|new| new.conflicts_with(old)));
    (!clash).then_some((planned, replaced))
}

pub(super) fn refuse_ports_in_use(planned: &[Mapping], busy: &host::BusyPorts) -> Result<()> {
    let wanted = planned.iter().map(|m| (m.protocol, &m.host));
    if let Some((protocol, host)) = busy.holds_any(wanted) {
        let owner = host::port_owner(protocol, host.port())
            .map(|owner| format!(" by {owner}"))
            .unwrap_or_default();
        bail!(
            "host port {}/{protocol} on {} is in use{owner}: publish another port, or --force to publish it anyway",
            host.port(),
            host.ip()
        );
    }
    Ok(())
}

/// What `withdraw` does when a name or selector matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Fail, removing nothing (the CLI).
    Error,
    /// Remove what matches (CNI DEL, which must be idempotent).
    Ignore,
}

/// Removes the mappings named `name` and those `selectors` match, all or
/// nothing; the mappings removed.
pub(crate) fn withdraw(
    pin_dir: &Path,
    name: Option<&str>,
    selectors: &[UnmapSelector],
    missing: Missing,
) -> Result<Withdrawn> {
    let mut session = Session::open_for_change(pin_dir, "unmap")?;
    let mut doomed: Vec<Mapping> = Vec::new();
    if let Some(name) = name {
        let named: Vec<Mapping> = session
            .mappings()?
            .into_iter()
            .filter(|m| m.name == name)
            .collect();
        if named.is_empty() && missing == Missing::Error {
            bail!("no mapping is named {name:?}");
        }
        doomed.extend(named);
    }
    for selector in selectors {
        // Through the port index and the services map when they can tell.
        let matched: Vec<Mapping> = match session.select(selector)? {
            Some(matched) => matched,
            None => session
                .mappings()?
                .into_iter()
                .filter(|m| selector.matches(m))
                .collect(),
        };
        if matched.is_empty() && missing == Missing::Error {
            bail!("nothing is published on {selector}");
        }
        for m in matched {
            if !doomed.contains(&m) {
                doomed.push(m);
            }
        }
    }
    session.change(&doomed, &[])?;
    // Release the ports: the holder closes what is no longer published.
    let notes = session.finish()?.notes;
    Ok(Withdrawn {
        mappings: doomed,
        notes,
    })
}

/// Removes exactly these mappings (those still published), all or
/// nothing, in one session; the mappings removed.
pub(crate) fn withdraw_these(pin_dir: &Path, mappings: &[Mapping]) -> Result<Vec<Mapping>> {
    let mut session = Session::open_for_change(pin_dir, "unmap")?;
    let found: Vec<Mapping> = session
        .mappings()?
        .into_iter()
        .filter(|m| mappings.contains(m))
        .collect();
    session.change(&found, &[])?;
    session.finish()?;
    Ok(found)
}

/// What `withdraw` removed, and notes for the user.
pub(crate) struct Withdrawn {
    pub(crate) mappings: Vec<Mapping>,
    pub(crate) notes: Vec<String>,
}

/// Removes exactly `mapping` (same name, protocol, host and container
/// endpoints) if it is published; whether it was.
pub(crate) fn withdraw_exact(pin_dir: &Path, mapping: &Mapping) -> Result<bool> {
    let mut session = Session::open_for_change(pin_dir, "unmap")?;
    // One lookup: the services map holds what the state file records.
    let found: Vec<Mapping> = session
        .maps
        .mapping(&mapping.key())?
        .into_iter()
        .filter(|m| m == mapping)
        .collect();
    session.change(&found, &[])?;
    session.finish()?;
    Ok(!found.is_empty())
}

/// Removes the mappings whose owner process is gone (see `state::owner`);
/// they are returned. Every session does it on opening; `up` calls this.
pub(crate) fn sweep_orphans(pin_dir: &Path) -> Result<Vec<Mapping>> {
    let mut session = Session::open(pin_dir, "up")?;
    let swept = std::mem::take(&mut session.swept);
    session.finish()?;
    Ok(swept)
}

/// Every mapping, under the state lock.
pub(crate) fn mappings(pin_dir: &Path) -> Result<Vec<Mapping>> {
    Session::open(pin_dir, "list")?.mappings()
}
