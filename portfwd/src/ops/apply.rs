//! `apply`: replacing the whole set of mappings with a file's.

use std::{
    cell::LazyCell,
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, bail};

use super::{Session, publish::refuse_ports_in_use};
use crate::{
    error::Error,
    host,
    model::{
        self, Allowlist, ApplyEntry, ApplyFile, Format, HostPorts, Mapping, Planner, PortRange,
        Protocol, PublishSpec,
    },
};

/// The difference `apply` makes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Diff {
    pub(crate) added: Vec<Mapping>,
    pub(crate) removed: Vec<Mapping>,
    pub(crate) kept: usize,
    /// For the user: what could not be done (see `Session::finish`).
    pub(crate) notes: Vec<String>,
}

/// Replaces the whole set of mappings with what `file` describes, all or
/// nothing (`dry_run`: only computes the difference). Automatic host ports
/// keep the port a matching mapping already has.
///
/// Linear in the size of the file and of the set: the current mappings come
/// from the services map (see `Session::mappings`), the difference goes by
/// host address, and only what differs reaches the maps and the state file.
pub(crate) fn apply(pin_dir: &Path, file: &ApplyFile, dry_run: bool) -> Result<Diff> {
    // A dry run changes nothing, not even what the host changed.
    let mut session = if dry_run {
        Session::open(pin_dir, "apply")?
    } else {
        Session::open_for_change(pin_dir, "apply")?
    };
    let current = session.mappings()?;
    let busy = host::BusyPorts::new();
    let wanted = plan_file(file, &current, &busy)?;
    let kept_or_added = wanted.len();
    let (removed, mut added) = difference(&current, wanted);
    let kept = kept_or_added - added.len();
    if dry_run {
        return Ok(Diff {
            added,
            removed,
            kept,
            notes: Vec::new(),
        });
    }
    // A host address taken over from a removed mapping is no new port.
    let replaced: HashSet<(Protocol, SocketAddr)> = removed.iter().map(Mapping::host_key).collect();
    let new_ports: Vec<Mapping> = added
        .iter()
        .filter(|m| !replaced.contains(&m.host_key()))
        .cloned()
        .collect();
    refuse_ports_in_use(&new_ports, &busy)?;
    for m in &mut added {
        m.ifindex = session.prepare_backend_path(m.container.ip())?;
    }
    session.maps.sync_local_addrs(&host::local_addresses()?)?;
    session.change(&removed, &added)?;
    let notes = session.finish()?.notes;
    Ok(Diff {
        added,
        removed,
        kept,
        notes,
    })
}

/// The mappings `file` asks for, planned together (each entry sees those
/// before it), with the allowlists of their entries.
fn plan_file(
    file: &ApplyFile,
    current: &[Mapping],
    busy: &host::BusyPorts,
) -> Result<Vec<Mapping>> {
    // Only automatic ports and pools search; only they need these.
    let held = LazyCell::new(|| -> HashSet<(Protocol, u16)> {
        current
            .iter()
            .map(|m| (m.protocol, m.host.port()))
            .collect()
    });
    let by_endpoint = LazyCell::new(|| by_endpoint(current));
    // Ports the current set holds are free for the new one.
    let in_use = |p, port| !held.contains(&(p, port)) && busy.any(p, port);
    let mut planner = Planner::new(&[]);
    let mut planned_per_entry = Vec::with_capacity(file.mappings.len());
    for entry in &file.mappings {
        let (name, specs) = check_entry(entry)?;
        let specs: Vec<PublishSpec> = if specs.iter().any(|s| s.host_ports == HostPorts::Auto) {
            specs
                .iter()
                .flat_map(|spec| keep_automatic_ports(spec, &name, entry.container, &by_endpoint))
                .collect()
        } else {
            specs
        };
        let count = planner
            .plan_more(&name, entry.container, &specs, in_use)
            .with_context(|| format!("mapping {name:?}"))?;
        planned_per_entry.push(count);
    }
    let mut wanted = planner.into_planned();
    let mut start = 0;
    for (entry, count) in file.mappings.iter().zip(planned_per_entry) {
        let planned = &mut wanted[start..start + count];
        start += count;
        let Some(allow) = &entry.allow else {
            continue;
        };
        // Each mapping keeps the networks of its own family (see
        // `publish_with`), so that unchanged lists compare equal.
        for m in planned {
            m.allow = Some(Allowlist {
                refuse: entry.refuse.unwrap_or_default(),
                ..allow.for_family(m.host.is_ipv4())
            });
        }
    }
    Ok(wanted)
}

/// Checks one entry of an apply file: its name and its specs, parsed.
fn check_entry(entry: &ApplyEntry) -> Result<(String, Vec<PublishSpec>)> {
    model::check_container_ip(entry.container)?;
    if entry.refuse.is_some() && entry.allow.is_none() {
        bail!(Error::usage(format!(
            "mapping for {}: `refuse` needs `allow` (without a list nobody is refused)",
            entry.container
        )));
    }
    let name = entry
        .name
        .clone()
        .unwrap_or_else(|| entry.container.to_string());
    model::check_name(&name)?;
    let specs = entry
        .publish
        .iter()
        .map(|text| text.parse::<PublishSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name, specs))
}

/// What `current` loses and what `wanted` adds: a mapping is kept when one
/// equal to it is on the same host address. Each set has at most one
/// mapping per host address (the planner saw to it for `wanted`), so both,
/// sorted by it, are walked side by side once.
fn difference(current: &[Mapping], mut wanted: Vec<Mapping>) -> (Vec<Mapping>, Vec<Mapping>) {
    let mut current: Vec<&Mapping> = current.iter().collect();
    current.sort_unstable_by_key(|m| m.host_key());
    wanted.sort_unstable_by_key(Mapping::host_key);
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    let mut current = current.into_iter().peekable();
    for new in wanted {
        while let Some(old) = current.next_if(|old| old.host_key() < new.host_key()) {
            removed.push(old.clone());
        }
        match current.next_if(|old| old.host_key() == new.host_key()) {
            Some(old) if *old == new => {}
            Some(old) => {
                removed.push(old.clone());
                added.push(new);
            }
            None => added.push(new),
        }
    }
    removed.extend(current.cloned());
    (removed, added)
}

/// The current mappings by (name, protocol, container endpoint).
type ByEndpoint<'a> = HashMap<(&'a str, Protocol, SocketAddr), Vec<&'a Mapping>>;

fn by_endpoint(current: &[Mapping]) -> ByEndpoint<'_> {
    let mut index: ByEndpoint<'_> = HashMap::new();
    for m in current {
        index
            .entry((m.name.as_str(), m.protocol, m.container))
            .or_default()
            .push(m);
    }
    index
}

/// A spec with automatic host ports becomes, where a mapping with the same
/// name, protocol and container endpoint exists, that mapping's port.
fn keep_automatic_ports(
    spec: &PublishSpec,
    name: &str,
    container: IpAddr,
    current: &ByEndpoint<'_>,
) -> Vec<PublishSpec> {
    if spec.host_ports != HostPorts::Auto {
        return vec![spec.clone()];
    }
    spec.container_ports
        .iter()
        .map(|port| {
            let endpoint = SocketAddr::new(container, port);
            let existing = current
                .get(&(name, spec.protocol, endpoint))
                .into_iter()
                .flatten()
                .find(|m| spec.host_ip.is_none_or(|ip| ip == m.host.ip()));
            PublishSpec {
                host_ports: match existing {
                    Some(m) => HostPorts::Each(PortRange::single(m.host.port())),
                    None => HostPorts::Auto,
                },
                container_ports: PortRange::single(port),
                ..spec.clone()
            }
        })
        .collect()
}

/// Reads an apply file; a missing or malformed file is a usage error.
pub(crate) fn read_apply_file(path: &Path) -> Result<ApplyFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Error::usage(format!("cannot read {}: {error}", path.display())))?;
    model::parse_apply(&text, Format::guess(path, &text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_keeps_equal_mappings_and_replaces_those_that_differ() {
        let at = |port: u16| Mapping::sample(port);
        let elsewhere = |port: u16| Mapping {
            container: "10.0.0.3:80".parse().unwrap(),
            ..at(port)
        };
        // The interface does not count; the order of either set does not.
        let installed = Mapping {
            ifindex: 9,
            ..at(2)
        };
        let current = [at(4), installed, at(1), at(3)];
        let wanted = vec![elsewhere(3), at(5), at(2), at(1)];
        let (removed, added) = difference(&current, wanted);
        assert_eq!(removed, [at(3), at(4)]);
        assert_eq!(added, [elsewhere(3), at(5)]);
        let (removed, added) = difference(&current, current.to_vec());
        assert!(removed.is_empty() && added.is_empty());
        let (removed, added) = difference(&[], vec![at(1)]);
        assert_eq!((removed, added), (vec![], vec![at(1)]));
    }
}
