//! `apply`: replacing the whole set of mappings with a file's.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{Context, Result, bail};

use super::{Session, publish::refuse_ports_in_use};
use crate::{
    error::Error,
    host,
    model::{
        self, Allowlist, ApplyFile, Format, HostPorts, Mapping, Planner, PortRange, Protocol,
        PublishSpec,
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
pub(crate) fn apply(pin_dir: &Path, file: &ApplyFile, dry_run: bool) -> Result<Diff> {
    // A dry run changes nothing, not even what the host changed.
    let mut session = if dry_run {
        Session::open(pin_dir, "apply")?
    } else {
        Session::open_for_change(pin_dir, "apply")?
    };
    let current = session.mappings()?;
    // Ports the current set holds are free for the new one.
    let held: HashSet<(Protocol, u16)> = current
        .iter()
        .map(|m| (m.protocol, m.host.port()))
        .collect();
    let busy = host::BusyPorts::new();
    let in_use = |p, port| !held.contains(&(p, port)) && busy.any(p, port);
    let by_endpoint = by_endpoint(&current);
    // One planner for the whole file: each entry sees those before it.
    let mut planner = Planner::new(&[]);
    let mut wanted: Vec<Mapping> = Vec::new();
    for entry in &file.mappings {
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
        let specs: Vec<PublishSpec> = specs
            .iter()
            .flat_map(|spec| keep_automatic_ports(spec, &name, entry.container, &by_endpoint))
            .collect();
        let planned = planner
            .plan(&name, entry.container, &specs, in_use)
            .with_context(|| format!("mapping {name:?}"))?;
        // Each mapping keeps the networks of its own family (see
        // `publish_with`), so that unchanged lists compare equal.
        wanted.extend(planned.into_iter().map(|m| Mapping {
            allow: entry.allow.as_ref().map(|a| Allowlist {
                refuse: entry.refuse.unwrap_or_default(),
                ..a.for_family(m.host.is_ipv4())
            }),
            ..m
        }));
    }
    let current_set: BTreeSet<&Mapping> = current.iter().collect();
    let wanted_set: BTreeSet<&Mapping> = wanted.iter().collect();
    let removed: Vec<Mapping> = current
        .iter()
        .filter(|m| !wanted_set.contains(m))
        .cloned()
        .collect();
    let mut added: Vec<Mapping> = wanted
        .iter()
        .filter(|m| !current_set.contains(m))
        .cloned()
        .collect();
    let diff_kept = wanted.len() - added.len();
    if dry_run {
        return Ok(Diff {
            added,
            removed,
            kept: diff_kept,
            notes: Vec::new(),
        });
    }
    let current_hosts: HashSet<(Protocol, SocketAddr)> =
        current.iter().map(|m| (m.protocol, m.host)).collect();
    let new_ports: Vec<Mapping> = added
        .iter()
        .filter(|m| !current_hosts.contains(&(m.protocol, m.host)))
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
        kept: diff_kept,
        notes,
    })
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
