//! The operations behind the commands, as a library: they print nothing,
//! so that other front ends (the CNI plugin) can use them.
//!
//! Every change goes through a `Session`: the state lock, the pinned maps
//! and the state file, changed together all or nothing (see `state`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::{
    UsageError, holder, host, loader,
    mapping::{self, Mapping, UnmapSelector},
    maps::{PinnedMaps, StateLock},
    netlink, owner,
    publish::{HostPorts, PortRange, PublishSpec},
    state::{self, ApplyFile, Record, Store},
};

/// How `publish` treats host ports that another process already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOptions {
    /// Refuse (exit 1, nothing changed) to publish a port a host process
    /// holds, naming it. Off for `--force`, and for runtimes that hold their
    /// containers' ports themselves (podman's conmon).
    pub refuse_ports_in_use: bool,
    /// Have the holder bind the host ports (off when the runtime binds
    /// them itself, as podman's conmon does, after the CNI ADD).
    pub hold_ports: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            refuse_ports_in_use: true,
            hold_ports: true,
        }
    }
}

/// What `publish` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub mappings: Vec<Mapping>,
    /// Published ports the holder could not bind (another process holds them).
    pub busy_ports: Vec<String>,
}

/// The state lock, the maps and the state file of one instance, for one
/// command. Opening it finishes (rolls back) a change that a killed process
/// left half done.
pub struct Session {
    pin_dir: PathBuf,
    lock: StateLock,
    maps: PinnedMaps,
    store: Store,
    records: Vec<Record>,
    /// What this session changed, for the port holder.
    added: Vec<Mapping>,
    removed: Vec<Mapping>,
    /// What opening the session repaired, if anything.
    pub recovered: Option<state::Fixes>,
    /// Mappings removed on opening because their owner process is gone
    /// (see `owner`).
    pub swept: Vec<Mapping>,
}

impl Session {
    pub fn open(pin_dir: &Path, command: &str) -> Result<Self> {
        host::require_capabilities(command, host::CHANGE)?;
        let lock = StateLock::acquire(pin_dir)?;
        let mut maps = PinnedMaps::open(pin_dir, &lock)?;
        let store = Store::new(state::default_path(pin_dir));
        let recovered = state::recover(&store, &mut maps)?;
        // Without a state file (a portfwd that predates it), the maps are
        // the record; the first change writes it.
        let records = match store.load()? {
            Some(records) => records,
            None => maps.mappings()?.iter().map(Record::from).collect(),
        };
        let mut session = Session {
            pin_dir: pin_dir.to_owned(),
            lock,
            maps,
            store,
            records,
            added: Vec::new(),
            removed: Vec::new(),
            recovered,
            swept: Vec::new(),
        };
        session.sweep_orphans()?;
        Ok(session)
    }

    /// Removes the mappings whose owner process is gone, and their claims.
    fn sweep_orphans(&mut self) -> Result<()> {
        let orphans = owner::orphans(&self.pin_dir);
        if orphans.is_empty() {
            return Ok(());
        }
        let doomed: Vec<Mapping> = self
            .mappings()
            .into_iter()
            .filter(|m| orphans.iter().flat_map(|(_, c)| c).any(|c| c.covers(m)))
            .collect();
        if !doomed.is_empty() {
            self.change(&doomed, &[])
                .context("removing the mappings of processes that are gone")?;
        }
        for (path, _) in &orphans {
            let _ = std::fs::remove_file(path);
        }
        // Gone when it was the last claim.
        let _ = std::fs::remove_dir(owner::claims_dir(&self.pin_dir));
        self.swept = doomed;
        Ok(())
    }

    /// The maps, to read (counters, stats).
    pub fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// Every mapping, as recorded.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.records.iter().map(Record::to_mapping).collect()
    }

    /// Applies a change to the maps and the state file, all or nothing.
    fn change(&mut self, removed: &[Mapping], added: &[Mapping]) -> Result<()> {
        let gone: BTreeSet<Record> = removed.iter().map(Record::from).collect();
        let mut records: Vec<Record> = self
            .records
            .iter()
            .filter(|r| !gone.contains(r))
            .cloned()
            .collect();
        records.extend(added.iter().map(Record::from));
        self.store.begin(&records)?;
        let applied = self.maps.remove_all(removed).and_then(|()| {
            self.maps.add_all(added).inspect_err(|_| {
                // Put back what was removed; add_all undid its own part.
                let _ = self.maps.add_all(removed);
            })
        });
        if let Err(error) = applied {
            self.store.abort();
            return Err(error);
        }
        self.store.commit()?;
        self.records = records;
        self.added.extend_from_slice(added);
        self.removed.extend_from_slice(removed);
        Ok(())
    }

    fn prepare_backend_path(&self, container_ip: IpAddr) -> Result<u32> {
        prepare_backend_path(&self.pin_dir, container_ip, &self.lock)
    }

    /// Tells the port holder what changed (after the lock is released). A
    /// session that recovered a killed change has the holder sync fully.
    fn finish(self) -> Result<Vec<String>> {
        let Session {
            pin_dir,
            lock,
            maps,
            added,
            removed,
            recovered,
            ..
        } = self;
        drop(maps);
        drop(lock);
        if recovered.is_some() {
            return holder::sync(&pin_dir);
        }
        holder::update(&pin_dir, &added, &removed)
    }
}

/// Publishes `specs` for a container, all or nothing; the mappings added.
pub fn publish(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
) -> Result<Vec<Mapping>> {
    Ok(publish_with(
        pin_dir,
        name,
        container_ip,
        specs,
        PublishOptions::default(),
    )?
    .mappings)
}

/// `publish`, with options.
pub fn publish_with(
    pin_dir: &Path,
    name: &str,
    container_ip: IpAddr,
    specs: &[PublishSpec],
    options: PublishOptions,
) -> Result<Published> {
    let mut session = Session::open(pin_dir, "map")?;
    let existing = session.mappings();
    let mut planned = mapping::plan(name, container_ip, specs, &existing, host::port_in_use)?;
    if options.refuse_ports_in_use {
        refuse_ports_in_use(&planned)?;
    }
    let ifindex = session.prepare_backend_path(container_ip)?;
    for m in &mut planned {
        m.ifindex = ifindex;
        m.hold = options.hold_ports;
    }
    // Wildcard mappings serve the host's addresses as they are now.
    session.maps.sync_local_addrs(&host::local_addresses()?)?;
    session.change(&[], &planned)?;
    let busy_ports = session.finish()?;
    Ok(Published {
        mappings: planned,
        busy_ports,
    })
}

fn refuse_ports_in_use(planned: &[Mapping]) -> Result<()> {
    for m in planned {
        if let Err(why) = holder::probe(m.protocol, m.host) {
            bail!(
                "host port {}/{} on {} is {why}: publish another port, or --force to publish it anyway",
                m.host.port(),
                m.protocol,
                m.host.ip()
            );
        }
    }
    Ok(())
}

/// What `withdraw` does when a name or selector matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Fail, removing nothing (the CLI).
    Error,
    /// Remove what matches (CNI DEL, which must be idempotent).
    Ignore,
}

/// Removes the mappings named `name` and those `selectors` match, all or
/// nothing; the mappings removed.
pub fn withdraw(
    pin_dir: &Path,
    name: Option<&str>,
    selectors: &[UnmapSelector],
    missing: Missing,
) -> Result<Vec<Mapping>> {
    let mut session = Session::open(pin_dir, "unmap")?;
    let existing = session.mappings();
    let mut doomed: Vec<Mapping> = Vec::new();
    if let Some(name) = name {
        let named: Vec<&Mapping> = existing.iter().filter(|m| m.name == name).collect();
        if named.is_empty() && missing == Missing::Error {
            bail!("no mapping is named {name:?}");
        }
        doomed.extend(named.into_iter().cloned());
    }
    for selector in selectors {
        let matched: Vec<&Mapping> = existing.iter().filter(|m| selector.matches(m)).collect();
        if matched.is_empty() && missing == Missing::Error {
            bail!("nothing is published on {selector}");
        }
        for m in matched {
            if !doomed.contains(m) {
                doomed.push(m.clone());
            }
        }
    }
    session.change(&doomed, &[])?;
    // Release the ports: the holder closes what is no longer published.
    session.finish()?;
    Ok(doomed)
}

/// Removes exactly `mapping` (same name, protocol, host and container
/// endpoints) if it is published; whether it was.
pub fn withdraw_exact(pin_dir: &Path, mapping: &Mapping) -> Result<bool> {
    let mut session = Session::open(pin_dir, "unmap")?;
    let key = Record::from(mapping);
    let found: Vec<Mapping> = session
        .mappings()
        .into_iter()
        .filter(|m| Record::from(m) == key)
        .collect();
    session.change(&found, &[])?;
    session.finish()?;
    Ok(!found.is_empty())
}

/// Removes the mappings whose owner process is gone (see `owner`); they
/// are returned. Every session does it on opening; `up` calls this.
pub fn sweep_orphans(pin_dir: &Path) -> Result<Vec<Mapping>> {
    let mut session = Session::open(pin_dir, "up")?;
    let swept = std::mem::take(&mut session.swept);
    session.finish()?;
    Ok(swept)
}

/// Every mapping, under the state lock.
pub fn mappings(pin_dir: &Path) -> Result<Vec<Mapping>> {
    Ok(Session::open(pin_dir, "list")?.mappings())
}

/// The difference `apply` makes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<Mapping>,
    pub removed: Vec<Mapping>,
    pub kept: usize,
}

/// Replaces the whole set of mappings with what `file` describes, all or
/// nothing (`dry_run`: only computes the difference). Automatic host ports
/// keep the port a matching mapping already has.
pub fn apply(pin_dir: &Path, file: &ApplyFile, dry_run: bool) -> Result<Diff> {
    let mut session = Session::open(pin_dir, "apply")?;
    let current = session.mappings();
    let mut wanted: Vec<Mapping> = Vec::new();
    for entry in &file.mappings {
        mapping::check_container_ip(entry.container)?;
        let name = entry
            .name
            .clone()
            .unwrap_or_else(|| entry.container.to_string());
        mapping::check_name(&name)?;
        let specs = entry
            .publish
            .iter()
            .map(|text| text.parse::<PublishSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        let specs: Vec<PublishSpec> = specs
            .iter()
            .flat_map(|spec| keep_automatic_ports(spec, &name, entry.container, &current))
            .collect();
        // Ports the current set holds are free for the new one.
        let held: BTreeSet<(crate::publish::Protocol, u16)> = current
            .iter()
            .map(|m| (m.protocol, m.host.port()))
            .collect();
        let in_use = |p, port| !held.contains(&(p, port)) && host::port_in_use(p, port);
        let planned = mapping::plan(&name, entry.container, &specs, &wanted, in_use)
            .with_context(|| format!("mapping {name:?}"))?;
        wanted.extend(planned);
    }
    let key = |m: &Mapping| Record::from(m);
    let current_keys: BTreeSet<Record> = current.iter().map(key).collect();
    let wanted_keys: BTreeSet<Record> = wanted.iter().map(key).collect();
    let removed: Vec<Mapping> = current
        .iter()
        .filter(|m| !wanted_keys.contains(&key(m)))
        .cloned()
        .collect();
    let mut added: Vec<Mapping> = wanted
        .iter()
        .filter(|m| !current_keys.contains(&key(m)))
        .cloned()
        .collect();
    let diff_kept = wanted.len() - added.len();
    if dry_run {
        return Ok(Diff {
            added,
            removed,
            kept: diff_kept,
        });
    }
    let new_ports: Vec<Mapping> = added
        .iter()
        .filter(|m| {
            !current
                .iter()
                .any(|c| c.protocol == m.protocol && c.host == m.host)
        })
        .cloned()
        .collect();
    refuse_ports_in_use(&new_ports)?;
    for m in &mut added {
        m.ifindex = session.prepare_backend_path(m.container.ip())?;
    }
    session.maps.sync_local_addrs(&host::local_addresses()?)?;
    session.change(&removed, &added)?;
    session.finish()?;
    Ok(Diff {
        added,
        removed,
        kept: diff_kept,
    })
}

/// A spec with automatic host ports becomes, where a mapping with the same
/// name, protocol and container endpoint exists, that mapping's port.
fn keep_automatic_ports(
    spec: &PublishSpec,
    name: &str,
    container: IpAddr,
    current: &[Mapping],
) -> Vec<PublishSpec> {
    if spec.host_ports != HostPorts::Auto {
        return vec![spec.clone()];
    }
    spec.container_ports
        .iter()
        .map(|port| {
            let endpoint = SocketAddr::new(container, port);
            let existing = current.iter().find(|m| {
                m.name == name
                    && m.protocol == spec.protocol
                    && m.container == endpoint
                    && spec.host_ip.is_none_or(|ip| ip == m.host.ip())
            });
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
pub fn read_apply_file(path: &Path) -> Result<ApplyFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| UsageError(format!("cannot read {}: {error}", path.display())))?;
    state::parse_apply(&text, state::Format::guess(path, &text))
}

/// The interface the kernel routes to the container through, with the reply
/// program attached to it (unless it is an uplink, whose own program handles
/// replies, or a default-route interface, where containers do not live).
/// 0 when the container is not reachable through an interface.
pub(crate) fn prepare_backend_path(
    pin_dir: &Path,
    container_ip: IpAddr,
    lock: &StateLock,
) -> Result<u32> {
    let Some(ifindex) = netlink::route_oif(container_ip)? else {
        return Ok(0);
    };
    let ifname = netlink::ifname(ifindex)?;
    if ifname == "lo" {
        return Ok(0);
    }
    if !loader::is_uplink(pin_dir, &ifname)
        && !netlink::default_route_interfaces()?.contains(&ifname)
    {
        loader::attach_backend(pin_dir, &ifname, lock)?;
    }
    Ok(ifindex)
}
