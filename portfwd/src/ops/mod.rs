//! The operations behind the commands, as a library: they print nothing,
//! so that both front ends (the CLI and the CNI plugin) use them.
//!
//! Every change goes through a `Session`: the state lock, the pinned maps
//! and the state file, changed together all or nothing (see `state`).

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use portfwd_common::{MAPS, SOCK_PROGRAMS};

use anyhow::{Context, Result};

use crate::{
    datapath::{self, PinnedMaps, StateLock},
    holder, host, instance,
    model::{Mapping, Record},
    state::{self, Store, owner},
};

mod apply;
mod lifecycle;
mod publish;

pub(crate) use apply::{apply, read_apply_file};
pub(crate) use lifecycle::{UpOptions, attach, detach, down, up};
pub(crate) use publish::{
    Missing, PublishOptions, mappings, publish_with, sweep_orphans, withdraw, withdraw_exact,
};

/// The state lock, the maps and the state file of one instance, for one
/// command. Opening it finishes (rolls back) a change that a killed process
/// left half done.
pub(crate) struct Session<'a> {
    pin_dir: &'a Path,
    lock: StateLock,
    maps: PinnedMaps,
    store: Store,
    records: Vec<Record>,
    /// What this session changed, for the port holder.
    added: Vec<Mapping>,
    removed: Vec<Mapping>,
    /// What opening the session repaired, if anything.
    pub(crate) recovered: Option<state::Fixes>,
    /// Mappings removed on opening because their owner process is gone
    /// (see `state::owner`).
    pub(crate) swept: Vec<Mapping>,
}

impl<'a> Session<'a> {
    pub(crate) fn open(pin_dir: &'a Path, command: &str) -> Result<Self> {
        host::require_capabilities(command, host::CHANGE)?;
        let lock = StateLock::acquire(pin_dir)?;
        let mut maps = PinnedMaps::open(pin_dir, &lock)?;
        let store = Store::of(pin_dir);
        let recovered = state::recover(&store, &mut maps, backend_paths(pin_dir, &lock))?;
        // Without a state file (a portfwd that predates it), the maps are
        // the record; the first change writes it.
        let records = match store.load()? {
            Some(records) => records,
            None => maps.mappings()?.iter().map(Record::from).collect(),
        };
        let mut session = Session {
            pin_dir,
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
        let orphans = owner::orphans(self.pin_dir);
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
        // Best effort: a claim left behind is swept again next time.
        for (path, _) in &orphans {
            std::fs::remove_file(path).ok();
        }
        // Gone when it was the last claim.
        std::fs::remove_dir(owner::claims_dir(self.pin_dir)).ok();
        self.swept = doomed;
        Ok(())
    }

    /// The maps, to read (counters, stats).
    pub(crate) fn maps(&self) -> &PinnedMaps {
        &self.maps
    }

    /// Every mapping, as recorded.
    pub(crate) fn mappings(&self) -> Vec<Mapping> {
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
        change_entries(&mut self.maps, &self.store, &records, removed, added)?;
        self.records = records;
        self.added.extend_from_slice(added);
        self.removed.extend_from_slice(removed);
        Ok(())
    }

    fn prepare_backend_path(&self, container_ip: IpAddr) -> Result<u32> {
        datapath::prepare_backend_path(self.pin_dir, container_ip, &self.lock)
    }

    /// Tells the port holder what changed (after the lock is released) and
    /// ends the host sockets connected through removed mappings. A session
    /// that recovered a killed change has the holder sync fully.
    fn finish(self) -> Result<Finished> {
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
        let notes = end_sockets_through_gone(pin_dir, &removed, &added)
            .into_iter()
            .collect();
        let busy_ports = if recovered.is_some() {
            holder::sync(pin_dir)?
        } else {
            holder::update(pin_dir, &added, &removed)?
        };
        Ok(Finished { busy_ports, notes })
    }
}

/// What a session reports once finished.
struct Finished {
    /// Published ports the holder could not bind (another process holds them).
    busy_ports: Vec<String>,
    /// For the user: what could not be done (sockets that could not end).
    notes: Vec<String>,
}

/// Ends the host UDP sockets connected through mappings that this change
/// removed or pointed elsewhere (see `datapath::end_sockets_through`), after
/// the lock is released. Best effort: the change is made either way; what
/// could not be ended is returned as a note.
fn end_sockets_through_gone(
    pin_dir: &Path,
    removed: &[Mapping],
    added: &[Mapping],
) -> Option<String> {
    let same = |a: &Mapping, b: &Mapping| {
        (a.protocol, a.host, a.container) == (b.protocol, b.host, b.container)
    };
    let gone: Vec<Mapping> = removed
        .iter()
        .filter(|r| !added.iter().any(|a| same(a, r)))
        .cloned()
        .collect();
    let why = match datapath::end_sockets_through(pin_dir, &gone) {
        Ok(report) => report.why_kept?,
        Err(error) => format!("{error:#}"),
    };
    Some(format!(
        "host UDP sockets connected through the removed mappings keep their old container: {why}"
    ))
}

/// Whether portfwd's maps and socket programs are pinned under `pin_dir`.
pub(crate) fn is_up(pin_dir: &Path) -> bool {
    let links = instance::links_dir(pin_dir);
    MAPS.iter().all(|m| pin_dir.join(m.name).exists())
        && SOCK_PROGRAMS.iter().all(|p| links.join(p.name).exists())
}

/// Resolves each container address to the interface towards it (attaching
/// the reply program there), once per address; 0 where that fails.
pub(crate) fn backend_paths<'a>(
    pin_dir: &'a Path,
    lock: &'a StateLock,
) -> impl FnMut(IpAddr) -> u32 + 'a {
    let mut known = std::collections::HashMap::new();
    move |ip| {
        *known
            .entry(ip)
            .or_insert_with(|| datapath::prepare_backend_path(pin_dir, ip, lock).unwrap_or(0))
    }
}

/// The writes a change makes to the services map.
trait MapWrites {
    /// Adds every mapping or, on failure, none.
    fn add_all(&mut self, mappings: &[Mapping]) -> Result<()>;
    /// Removes every mapping or, on failure, none.
    fn remove_all(&mut self, mappings: &[Mapping]) -> Result<()>;
}

impl MapWrites for PinnedMaps {
    fn add_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        PinnedMaps::add_all(self, mappings)
    }

    fn remove_all(&mut self, mappings: &[Mapping]) -> Result<()> {
        PinnedMaps::remove_all(self, mappings)
    }
}

/// One change, as `state` describes it: the intent (`records`), the maps,
/// then the commit. When the maps cannot be put back after a failure, the
/// intent stays: the next command (or `up`) rolls the maps back to the
/// state file.
fn change_entries(
    maps: &mut impl MapWrites,
    store: &Store,
    records: &[Record],
    removed: &[Mapping],
    added: &[Mapping],
) -> Result<()> {
    store.begin(records)?;
    if let Err(error) = maps.remove_all(removed) {
        // remove_all put back what it had removed.
        store.abort();
        return Err(error);
    }
    if let Err(error) = maps.add_all(added) {
        // add_all undid its own part; put back what was removed.
        if let Err(put_back) = maps.add_all(removed) {
            return Err(error.context(format!(
                "and putting back the mappings it replaced failed too ({put_back:#}): \
                 the next portfwd command restores them from {}",
                store.path().display()
            )));
        }
        store.abort();
        return Err(error);
    }
    store.commit()
}

#[cfg(test)]
mod tests {
    use anyhow::bail;

    use super::*;
    use crate::model::Protocol;

    /// Maps whose adds always fail (a full map, say).
    struct FullMaps;

    impl MapWrites for FullMaps {
        fn add_all(&mut self, _: &[Mapping]) -> Result<()> {
            bail!("the services map is full")
        }

        fn remove_all(&mut self, _: &[Mapping]) -> Result<()> {
            Ok(())
        }
    }

    fn mapping(port: u16) -> Mapping {
        Mapping {
            name: "web".into(),
            protocol: Protocol::Tcp,
            host: format!("0.0.0.0:{port}").parse().unwrap(),
            container: "10.0.0.2:80".parse().unwrap(),
            ifindex: 0,
            hold: true,
        }
    }

    /// A replacement whose add fails and whose put-back fails too leaves
    /// the maps in neither state: the intent must stay for the next
    /// command to roll back, and the error must say so.
    #[test]
    fn a_failed_put_back_keeps_the_intent() {
        let dir = std::env::temp_dir().join(format!("portfwd-ops-{}", std::process::id()));
        let store = Store::new(dir.join("state.json"));
        let (old, new) = (mapping(8080), mapping(8081));
        store.save(&[Record::from(&old)]).unwrap();
        let error = change_entries(
            &mut FullMaps,
            &store,
            &[Record::from(&new)],
            std::slice::from_ref(&old),
            &[new],
        )
        .unwrap_err();
        assert!(store.has_pending(), "the rollback was lost");
        assert!(format!("{error:#}").contains("putting back"), "{error:#}");
        assert_eq!(store.load().unwrap(), Some(vec![Record::from(&old)]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
