//! The operations behind the commands, as a library: they print nothing,
//! so that both front ends (the CLI and the CNI plugin) use them.
//!
//! Every change goes through a `Session`: the state lock, the pinned maps
//! and the state file, changed together all or nothing (see `state`).

use std::{collections::HashSet, net::IpAddr, path::Path};

use portfwd_common::{MAPS, SOCK_PROGRAMS};

use anyhow::{Context, Result};

use crate::{
    datapath::{self, PinnedMaps, StateLock},
    holder, host, instance,
    model::{Mapping, Record},
    state::{self, Loaded, Store, owner},
};

mod apply;
mod conntrack;
mod explain;
mod lifecycle;
mod publish;
pub(crate) mod rootless;

pub(crate) use apply::{apply, read_apply_file};
pub(crate) use conntrack::{FlowFilter, flows, flush_flows};
pub(crate) use explain::{Explanation, MatchKind, Question, explain};
pub(crate) use lifecycle::{UpOptions, attach, detach, down, rebuild_state, up};
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
    /// The recorded mappings.
    state: Loaded,
    /// What this session changed, for the port holder.
    added: Vec<Mapping>,
    removed: Vec<Mapping>,
    /// What opening the session repaired, if anything.
    pub(crate) recovered: Option<state::Fixes>,
    /// Mappings removed on opening because their owner process is gone
    /// (see `state::owner`).
    pub(crate) swept: Vec<Mapping>,
    /// What opening the session repaired or could not, for the user.
    pub(crate) notes: Vec<String>,
}

impl<'a> Session<'a> {
    pub(crate) fn open(pin_dir: &'a Path, command: &str) -> Result<Self> {
        host::require_capabilities(command, host::CHANGE)?;
        let lock = StateLock::acquire(pin_dir)?;
        let mut maps = PinnedMaps::open(pin_dir, &lock)?;
        let store = Store::of(pin_dir);
        let recovered = state::recover(&store, &mut maps, datapath::backend_paths(pin_dir, &lock))?;
        // Without a state file (a portfwd that predates it), the maps are
        // the record; the first change writes it.
        let state = match store.load_for_change()? {
            Some(state) => state,
            None => Loaded {
                records: maps.mappings()?.iter().map(Record::from).collect(),
                compact: true,
            },
        };
        let mut session = Session {
            pin_dir,
            lock,
            maps,
            store,
            state,
            added: Vec::new(),
            removed: Vec::new(),
            recovered,
            swept: Vec::new(),
            notes: Vec::new(),
        };
        session.sweep_orphans()?;
        Ok(session)
    }

    /// A session for a change: it first brings the attachments and the
    /// mappings' interfaces in line with the host's interfaces (recreated
    /// since: see `datapath::follow_host`), so that every change repairs
    /// what the host changed behind portfwd's back.
    pub(crate) fn open_for_change(pin_dir: &'a Path, command: &str) -> Result<Self> {
        let mut session = Self::open(pin_dir, command)?;
        // A repair that fails must not stop the change asked for: it is
        // reported, and tried again by the next command or the holder.
        match datapath::follow_host(
            pin_dir,
            &session.lock,
            &mut session.maps,
            datapath::Follow::WhatDied,
        ) {
            Ok(fixes) => session.notes.extend(fixes.links.notes()),
            Err(error) => session
                .notes
                .push(format!("following the host's interfaces failed: {error:#}")),
        }
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
        self.state.records.iter().map(Record::to_mapping).collect()
    }

    /// Applies a change to the maps and the state file, all or nothing.
    fn change(&mut self, removed: &[Mapping], added: &[Mapping]) -> Result<()> {
        let gone: Vec<Record> = removed.iter().map(Record::from).collect();
        let new: Vec<Record> = added.iter().map(Record::from).collect();
        let doomed: HashSet<&Record> = gone.iter().collect();
        let kept = |r: &&Record| !doomed.contains(r);
        // The whole new state is built only when it is written whole.
        let snapshot: Option<Vec<Record>> = self.state.compact.then(|| {
            let records = self.state.records.iter().filter(kept);
            records.chain(&new).cloned().collect()
        });
        let change = Change {
            snapshot: snapshot.as_deref(),
            gone: &gone,
            new: &new,
        };
        change_entries(&mut self.maps, &self.store, change, removed, added)?;
        match snapshot {
            Some(records) => self.state.records = records,
            None => {
                self.state.records.retain(|r| kept(&r));
                self.state.records.extend(new);
            }
        }
        self.state.compact = false;
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

/// A change to the state file: the records it removes and adds, and the
/// whole state it makes when that is written whole (see `Loaded::compact`).
struct Change<'a> {
    snapshot: Option<&'a [Record]>,
    gone: &'a [Record],
    new: &'a [Record],
}

/// One change, as `state` describes it: the intent, the maps, then the
/// commit. When the maps cannot be put back after a failure, the intent
/// stays: the next command (or `up`) rolls the maps back to the state file.
fn change_entries(
    maps: &mut impl MapWrites,
    store: &Store,
    change: Change<'_>,
    removed: &[Mapping],
    added: &[Mapping],
) -> Result<()> {
    let intent = store.begin(change.gone, change.new)?;
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
    store.commit(intent, change.snapshot)
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
            allow: None,
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
        let change = Change {
            snapshot: None,
            gone: &[Record::from(&old)],
            new: &[Record::from(&new)],
        };
        let error = change_entries(
            &mut FullMaps,
            &store,
            change,
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
