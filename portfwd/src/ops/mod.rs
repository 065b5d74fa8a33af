//! The operations behind the commands, as a library: they print nothing,
//! so that both front ends (the CLI and the CNI plugin) use them.
//!
//! Every change goes through a `Session`: the state lock, the pinned maps
//! and the state file, changed together all or nothing (see `state`).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use portfwd_common::{MAPS, SOCK_PROGRAMS};

use anyhow::{Context, Result};

use crate::{
    datapath::{self, PinnedMaps, StateLock},
    holder, host, instance,
    model::{self, Mapping, PortKey, UnmapSelector},
    state::{self, Loaded, PortIndex, Store, owner},
};

mod apply;
mod conntrack;
mod explain;
mod lifecycle;
mod publish;
pub(crate) mod rootless;

pub(crate) use apply::{apply, read_apply_file};
pub(crate) use conntrack::{FlowFilter, flows, flush_flows};
pub(crate) use explain::{Explanation, MatchKind, Matched, Question, explain};
pub(crate) use lifecycle::{UpOptions, attach, detach, down, rebuild_state, up};
pub(crate) use publish::{
    Missing, PublishOptions, mappings, publish_with, sweep_orphans, withdraw, withdraw_exact,
};

/// From this many mappings, a change checks whether it makes the journal
/// outgrow the snapshot (see `Session::change`).
const COMPACT_NOW_FROM: usize = 64;

/// The state lock, the maps and the state file of one instance, for one
/// command. Opening it finishes (rolls back) a change that a killed process
/// left half done. It reads the state file only when the command needs
/// every mapping, or the port index is stale (see `state`).
pub(crate) struct Session<'a> {
    pin_dir: &'a Path,
    lock: StateLock,
    maps: PinnedMaps,
    store: Store,
    /// The recorded mappings, once read (see `loaded`).
    state: Option<Loaded>,
    /// The port index, while it describes the state file.
    index: Option<PortIndex>,
    /// What this session changed.
    added: Vec<Mapping>,
    removed: Vec<Mapping>,
    /// Ports the holder was asked to bind ahead of the change (see
    /// `holder::bind_ahead`), and the added mappings it was not: the
    /// `update` at the end names only these (and the removed ones).
    ahead: Vec<holder::Ahead>,
    added_not_ahead: Vec<Mapping>,
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
        // A stale index (or a journal due for compaction) means reading the
        // state file now, which also checks that it is whole.
        let (state, index) = match store.current_index() {
            Some(index) => (None, Some(index)),
            None => (Some(load(&store, &maps)?), store.index()),
        };
        let mut session = Session {
            pin_dir,
            lock,
            maps,
            store,
            state,
            index,
            added: Vec::new(),
            ahead: Vec::new(),
            added_not_ahead: Vec::new(),
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
            .mappings()?
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

    /// The recorded mappings, read now if they were not yet.
    fn loaded(&mut self) -> Result<&mut Loaded> {
        let state = match self.state.take() {
            Some(state) => state,
            None => load(&self.store, &self.maps)?,
        };
        Ok(self.state.insert(state))
    }

    /// Every mapping, as recorded: the state file's, once read; otherwise
    /// the services map's. While the port index is current the two hold the
    /// same mappings (opening the session rolled back any change left half
    /// done, and every change writes both), and the map is read in a few
    /// calls where the state file would be read and parsed whole.
    pub(crate) fn mappings(&mut self) -> Result<Vec<Mapping>> {
        if let (None, Some(_)) = (&self.state, &self.index) {
            return self.maps.mappings();
        }
        Ok(self.loaded()?.mappings.clone())
    }

    /// The published mappings that a request for exactly `ports` (None: a
    /// request with automatic ports or pools) may conflict with: none when
    /// the port index says that nothing is published on any of them;
    /// otherwise every mapping.
    pub(crate) fn conflict_candidates(
        &mut self,
        ports: Option<&[PortKey]>,
    ) -> Result<Vec<Mapping>> {
        if let (Some(ports), Some(index), None) = (ports, &mut self.index, &self.state) {
            let mut taken = false;
            for &(protocol, port, ipv4) in ports {
                taken |= index.count(protocol, ipv4, port)? > 0;
            }
            if !taken {
                return Ok(Vec::new());
            }
        }
        self.mappings()
    }

    /// The mappings `selector` matches, looked up in the services map on the
    /// ports the index says are published; None when the lookups cannot
    /// tell (a selector without a host address, on a port that has mappings
    /// on specific addresses): then every mapping must be read.
    fn select(&mut self, selector: &UnmapSelector) -> Result<Option<Vec<Mapping>>> {
        let (Some(index), None) = (&mut self.index, &self.state) else {
            return Ok(None);
        };
        let mut found = Vec::new();
        for port in selector.ports.iter() {
            for ipv4 in [true, false] {
                if selector.host_ip.is_some_and(|ip| ip.is_ipv4() != ipv4) {
                    continue;
                }
                let count = index.count(selector.protocol, ipv4, port)?;
                if count == 0 {
                    continue;
                }
                let wildcard: IpAddr = if ipv4 {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                let host = SocketAddr::new(selector.host_ip.unwrap_or(wildcard), port);
                let published = self
                    .maps
                    .mapping(&model::service_key(selector.protocol, host))?;
                if selector.host_ip.is_none() && count > u32::from(published.is_some()) {
                    return Ok(None);
                }
                found.extend(published);
            }
        }
        Ok(Some(found))
    }

    /// Applies a change to the maps and the state file, all or nothing.
    fn change(&mut self, removed: &[Mapping], added: &[Mapping]) -> Result<()> {
        // A large change whose line would make the journal outgrow the
        // snapshot writes a new snapshot itself: the commands after it find
        // a compact file, and need not read it (see `Store::current_index`),
        // where before the next one read the whole journal and compacted.
        // (A small change cannot outgrow it by much: the next command does.)
        if removed.len() + added.len() >= COMPACT_NOW_FROM
            && self.store.outgrows(model::journal_line_len(removed, added))
        {
            self.loaded()?.compact = true;
        }
        let doomed: HashSet<_> = removed.iter().map(Mapping::host_key).collect();
        let kept = |m: &&Mapping| !doomed.contains(&m.host_key());
        // The whole new state is built only when it is written whole.
        let snapshot: Option<Vec<Mapping>> = match &self.state {
            Some(state) if state.compact => {
                let mappings = state.mappings.iter().filter(kept);
                Some(mappings.chain(added).cloned().collect())
            }
            _ => None,
        };
        let index = self.index.as_mut();
        // The holder binds a large change's ports while the maps are written
        // (its answer is awaited by `finish`, without the lock).
        let ahead = holder::bind_ahead(self.pin_dir, added);
        let changed = change_entries(
            &mut self.maps,
            &self.store,
            snapshot.as_deref(),
            removed,
            added,
            index,
        );
        match (ahead, changed) {
            (Some(ahead), Err(error)) => {
                // Whatever it bound is let go below.
                drop(ahead.finish());
                // Best effort: a port left held is released at the next sync.
                holder::update(self.pin_dir, &[], added).ok();
                return Err(error);
            }
            (Some(ahead), Ok(())) => self.ahead.push(ahead),
            (None, changed) => {
                changed?;
                self.added_not_ahead.extend_from_slice(added);
            }
        }
        if let Some(state) = &mut self.state {
            match snapshot {
                Some(mappings) => state.mappings = mappings,
                None => {
                    state.mappings.retain(|m| kept(&m));
                    state.mappings.extend_from_slice(added);
                }
            }
            state.compact = false;
        }
        // A new snapshot comes with a new index.
        if self.index.is_none() {
            self.index = self.store.index();
        }
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
            ahead,
            added_not_ahead,
            removed,
            recovered,
            ..
        } = self;
        drop(maps);
        drop(lock);
        let mut busy_ports = Vec::new();
        let mut all_answered = true;
        for ahead in ahead {
            match ahead.finish() {
                Some(busy) => busy_ports.extend(busy),
                None => all_answered = false,
            }
        }
        let notes = end_sockets_through_gone(pin_dir, &removed, &added)
            .into_iter()
            .collect();
        // A holder that did not answer the ports sent ahead (it died, or
        // none ran) syncs whole, as after a recovered change.
        if recovered.is_some() || !all_answered {
            busy_ports = holder::sync(pin_dir)?;
        } else {
            busy_ports.extend(holder::update(pin_dir, &added_not_ahead, &removed)?);
        }
        Ok(Finished { busy_ports, notes })
    }
}

/// The recorded mappings, read from the state file. Without one (a portfwd
/// that predates it), the maps are the record; the first change writes it.
fn load(store: &Store, maps: &PinnedMaps) -> Result<Loaded> {
    Ok(match store.load_for_change()? {
        Some(state) => state,
        None => Loaded {
            mappings: maps.mappings()?,
            compact: true,
        },
    })
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

/// One change, as `state` describes it: the intent, the maps, then the
/// commit (with `snapshot`, the whole state it makes, when that is written
/// whole: see `Loaded::compact`). When the maps cannot be put back after a
/// failure, the intent stays: the next command (or `up`) rolls the maps
/// back to the state file.
fn change_entries(
    maps: &mut impl MapWrites,
    store: &Store,
    snapshot: Option<&[Mapping]>,
    removed: &[Mapping],
    added: &[Mapping],
    index: Option<&mut PortIndex>,
) -> Result<()> {
    let intent = store.begin(removed, added)?;
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
    store.commit(intent, snapshot, index)
}

#[cfg(test)]
mod tests {
    use anyhow::bail;

    use super::*;

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

    /// A replacement whose add fails and whose put-back fails too leaves
    /// the maps in neither state: the intent must stay for the next
    /// command to roll back, and the error must say so.
    #[test]
    fn a_failed_put_back_keeps_the_intent() {
        let dir = std::env::temp_dir().join(format!("portfwd-ops-{}", std::process::id()));
        let store = Store::new(dir.join("state.json"));
        let (old, new) = (Mapping::sample(8080), Mapping::sample(8081));
        store.save(std::slice::from_ref(&old)).unwrap();
        let error = change_entries(
            &mut FullMaps,
            &store,
            None,
            std::slice::from_ref(&old),
            &[new],
            None,
        )
        .unwrap_err();
        assert!(store.has_pending(), "the rollback was lost");
        assert!(format!("{error:#}").contains("putting back"), "{error:#}");
        assert_eq!(store.load().unwrap(), Some(vec![old]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
