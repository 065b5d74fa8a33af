//! Bringing the maps in line with the recorded state.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Result;

use super::Store;
use crate::{datapath::PinnedMaps, model::Mapping};

/// What a reconciliation changed in the maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Fixes {
    pub(crate) added: Vec<Mapping>,
    pub(crate) removed: Vec<Mapping>,
}

/// Makes the maps hold exactly `recorded` (entries that differ in more
/// than their interface are replaced). The caller holds the state lock.
pub(crate) fn reconcile(
    maps: &mut PinnedMaps,
    recorded: &[Mapping],
    mut ifindex_of: impl FnMut(IpAddr) -> u32,
) -> Result<Fixes> {
    let wanted: BTreeSet<&Mapping> = recorded.iter().collect();
    let current: Vec<Mapping> = maps.mappings()?;
    let have: BTreeSet<&Mapping> = current.iter().collect();
    let removed: Vec<Mapping> = current
        .iter()
        .filter(|m| !wanted.contains(m))
        .cloned()
        .collect();
    let added: Vec<Mapping> = wanted
        .difference(&have)
        .map(|&m| Mapping {
            ifindex: ifindex_of(m.container.ip()),
            ..m.clone()
        })
        .collect();
    maps.remove_all(&removed)?;
    maps.add_all(&added)?;
    Ok(Fixes { added, removed })
}

/// Finishes or undoes a change that a killed process left half done: the
/// maps go back to the state file. Called under the state lock by every
/// command that reads or changes mappings. Returns what it fixed.
/// Mappings it puts back get their interface from `ifindex_of`, as new ones
/// do (the TC path redirects to it).
pub(crate) fn recover(
    store: &Store,
    maps: &mut PinnedMaps,
    ifindex_of: impl FnMut(IpAddr) -> u32,
) -> Result<Option<Fixes>> {
    if !store.has_pending() {
        return Ok(None);
    }
    let recorded = store.load()?.unwrap_or_default();
    let fixes = reconcile(maps, &recorded, ifindex_of)?;
    store.abort();
    Ok(Some(fixes))
}
